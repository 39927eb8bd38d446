//! Timelines of pod runs as hand-written SVG (no script, no fonts of its
//! own: it renders wherever an `<img>` does, GitHub's README included), and
//! the `index.html` that shows several.
//!
//! A [`Figure`] is one scenario: its [`Run`]s stacked on one time axis (the
//! same pod without and with the shim), one row per container. A container's
//! row has, per attempt, a thin lead-in from containerd's `created_at` to
//! `started_at` and a bar from `started_at` to `finished_at` with the exit
//! code at its end; dots for moments the container recorded itself; under
//! the containers the pod phase kubelet computed. Times are wall-clock
//! nanoseconds (the CRI's), drawn relative to the run's first container
//! creation.
//!
//! Pure: data in, text out. Its tests are in `tests/demo.rs`.

use std::fmt::Write as _;

/// What a moment means, for its colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    Good,
    Bad,
    Info,
}

impl Tone {
    fn colour(self) -> &'static str {
        match self {
            Tone::Good => "#1f8a4c",
            Tone::Bad => "#d0342c",
            Tone::Info => "#4d5156",
        }
    }

    /// The word the containers write in their marks files.
    pub fn parse(word: &str) -> Option<Tone> {
        match word {
            "good" => Some(Tone::Good),
            "bad" => Some(Tone::Bad),
            "info" => Some(Tone::Info),
            _ => None,
        }
    }
}

/// A moment: wall-clock nanoseconds since the epoch and what happened.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    pub at: i64,
    pub label: String,
    pub tone: Tone,
}

/// One attempt of a container as containerd reports it (CRI
/// `ContainerStatus`): wall-clock nanoseconds, 0 for "not (yet)".
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    /// What kubelet read instead, where that differs from containerd (the
    /// shim reports a sidecar it stopped as exit 0): shown after the exit
    /// code.
    pub reported: Option<String>,
}

/// One container of the pod: a row.
#[derive(Clone, Debug, PartialEq)]
pub struct Lane {
    pub name: String,
    pub sidecar: bool,
    /// Oldest first.
    pub attempts: Vec<Attempt>,
    pub marks: Vec<Mark>,
}

/// One run of a scenario's pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub label: String,
    /// In spec order.
    pub lanes: Vec<Lane>,
    /// The pod phase kubelet computed, each with the moment it began, in
    /// order.
    pub phases: Vec<(i64, String)>,
    /// Moments of the whole pod (its deletion): drawn across the rows.
    pub pod_marks: Vec<Mark>,
    /// The end of the observation: what still runs is drawn up to here.
    pub end: i64,
    /// Observation stopped while the pod had not finished (drawn as a
    /// "cut-off" line).
    pub cut_off: bool,
}

impl Run {
    /// The first container creation: time zero of the drawing.
    pub fn t0(&self) -> i64 {
        self.lanes
            .iter()
            .flat_map(|l| &l.attempts)
            .map(|a| a.created_at)
            .filter(|&t| t > 0)
            .min()
            .unwrap_or(self.end)
    }

    /// The last moment anything in the run has.
    fn last(&self) -> i64 {
        let marks = self
            .lanes
            .iter()
            .flat_map(|l| &l.marks)
            .chain(&self.pod_marks)
            .map(|m| m.at);
        let finished = self
            .lanes
            .iter()
            .flat_map(|l| &l.attempts)
            .map(|a| a.finished_at);
        marks.chain(finished).fold(self.end, i64::max)
    }

    /// The lane of container `name`.
    pub fn lane(&self, name: &str) -> Option<&Lane> {
        self.lanes.iter().find(|l| l.name == name)
    }

    /// The final phase, as drawn at the end of the phase row.
    pub fn outcome(&self) -> String {
        let phase = self.phases.last().map_or("Pending", |(_, p)| p.as_str());
        let terminal = matches!(phase, "Succeeded" | "Failed");
        if self.cut_off && !terminal {
            format!("{phase} at cut-off")
        } else {
            phase.to_string()
        }
    }
}

/// One scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub title: String,
    /// What to look at (one or two sentences).
    pub caption: String,
    pub runs: Vec<Run>,
}

// ---------------------------------------------------------------------------
// Layout (SVG user units = CSS pixels)

const WIDTH: f64 = 980.0;
/// Container names, right-aligned before the plot.
const LEFT: f64 = 150.0;
/// The time axis; what is right of it holds the exit labels.
const PLOT: f64 = 620.0;
const LANE_H: f64 = 60.0;
const PHASE_H: f64 = 34.0;
const AXIS_H: f64 = 34.0;
const CHAR_W: f64 = 6.3;
const FONT: &str = "font-family=\"Helvetica, Arial, sans-serif\"";

const LEAD_IN: &str = "#9aa0a6";
const SIDECAR: &str = "#8a63c9";
const APP: &str = "#2f74c0";

fn phase_colour(phase: &str) -> &'static str {
    match phase {
        "Pending" => "#c9ccd1",
        "Running" => "#8dbbe8",
        "Succeeded" => "#1f8a4c",
        "Failed" => "#d0342c",
        _ => "#999999",
    }
}

/// XML-escape text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn text_width(text: &str) -> f64 {
    text.chars().count() as f64 * CHAR_W
}

/// Seconds for a time axis of `span` seconds: ticks no denser than 12.
fn tick_step(span: f64) -> f64 {
    [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
        .into_iter()
        .find(|s| span / s <= 12.0)
        .unwrap_or(600.0)
}

/// Split `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Seconds from `t0`, as the axis shows them.
fn secs(at: i64, t0: i64) -> f64 {
    (at - t0) as f64 / 1e9
}

/// Maps a run's times to x.
struct Scale {
    t0: i64,
    span: f64,
}

impl Scale {
    fn x(&self, at: i64) -> f64 {
        let s = secs(at, self.t0).clamp(0.0, self.span);
        LEFT + s / self.span * PLOT
    }
}

/// Where the last label above a row ends: a label that would overlap it
/// goes below the row instead.
#[derive(Default)]
struct Shelf {
    above: f64,
}

/// The figure as an SVG document.
pub fn render_svg(fig: &Figure) -> String {
    // One scale for every run: the longest decides.
    let span = fig
        .runs
        .iter()
        .map(|r| secs(r.last(), r.t0()))
        .fold(1.0_f64, f64::max)
        .ceil();
    let caption = wrap(&fig.caption, 130);
    let mut body = String::new();
    let mut y = 30.0;
    let _ = writeln!(
        body,
        r##"<text x="16" y="{y}" font-size="18" font-weight="bold" fill="#202124">{}</text>"##,
        escape(&fig.title)
    );
    for line in &caption {
        y += 19.0;
        let _ = writeln!(
            body,
            r##"<text x="16" y="{y}" font-size="13" fill="#3c4043">{}</text>"##,
            escape(line)
        );
    }
    y += 14.0;
    for run in &fig.runs {
        y = draw_run(&mut body, run, span, y);
    }
    y = draw_legend(&mut body, y);
    let height = (y + 8.0).ceil();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" {FONT}>\n\
         <title>{}</title>\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n{body}</svg>\n",
        escape(&fig.title)
    )
}

/// One run from `top`; returns where the next begins.
fn draw_run(out: &mut String, run: &Run, span: f64, top: f64) -> f64 {
    let scale = Scale { t0: run.t0(), span };
    let _ = writeln!(
        out,
        r#"<g class="run" data-label="{}">"#,
        escape(&run.label)
    );
    let _ = writeln!(
        out,
        r##"<text x="16" y="{}" font-size="14" font-weight="bold" fill="#202124">{}</text>"##,
        top + 18.0,
        escape(&run.label)
    );
    // Between the heading and the rows: the labels of the lines across.
    let strip = top + 38.0;
    let rows_top = top + 44.0;
    let mut y = rows_top;
    for lane in &run.lanes {
        draw_lane(out, lane, &scale, run.end, y);
        y += LANE_H;
    }
    draw_phases(out, run, &scale, y);
    let rows_bottom = y + PHASE_H - 6.0;

    // Lines across the rows: the pod's own moments and the cut-off.
    let mut lines: Vec<(i64, String, &str)> = run
        .pod_marks
        .iter()
        .map(|m| (m.at, m.label.clone(), m.tone.colour()))
        .collect();
    if run.cut_off {
        lines.push((run.end, "cut-off".to_string(), "#5f6368"));
    }
    for (at, label, colour) in lines {
        let x = scale.x(at);
        let _ = writeln!(
            out,
            r#"<g class="pod-mark"><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{rows_bottom:.1}" stroke="{colour}" stroke-width="1.2" stroke-dasharray="5 4"/><text x="{:.1}" y="{:.1}" font-size="11" fill="{colour}">{}</text></g>"#,
            strip - 11.0,
            x + 4.0,
            strip,
            escape(&label)
        );
    }

    let axis_top = y + PHASE_H;
    draw_axis(out, &scale, axis_top);
    out.push_str("</g>\n");
    axis_top + AXIS_H + 10.0
}

fn draw_lane(out: &mut String, lane: &Lane, scale: &Scale, end: i64, top: f64) {
    let cy = top + 27.0;
    let colour = if lane.sidecar { SIDECAR } else { APP };
    let _ = writeln!(
        out,
        r#"<g class="lane" data-container="{}">"#,
        escape(&lane.name)
    );
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="end" fill="#202124">{}</text>"##,
        LEFT - 12.0,
        cy + 1.0,
        escape(&lane.name)
    );
    if lane.sidecar {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#80868b">sidecar</text>"##,
            LEFT - 12.0,
            cy + 13.0
        );
    }
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="#f1f3f4" stroke-width="1"/>"##,
        LEFT + PLOT
    );
    for a in &lane.attempts {
        draw_attempt(out, &lane.name, a, colour, scale, end, cy);
    }
    let mut shelf = Shelf::default();
    let mut marks: Vec<&Mark> = lane.marks.iter().collect();
    marks.sort_by_key(|m| m.at);
    for m in marks {
        let x = scale.x(m.at);
        let w = text_width(&m.label);
        let lx = x - 4.0;
        let ly = if lx >= shelf.above + 8.0 {
            shelf.above = lx + w;
            cy - 12.0
        } else {
            cy + 22.0
        };
        let _ = writeln!(
            out,
            r#"<g class="mark"><circle cx="{x:.1}" cy="{cy:.1}" r="5" fill="{c}" stroke="white" stroke-width="1.5"><title>{} at {:.2} s</title></circle><text x="{lx:.1}" y="{ly:.1}" font-size="11" fill="{c}">{}</text></g>"#,
            escape(&m.label),
            secs(m.at, scale.t0),
            escape(&m.label),
            c = m.tone.colour()
        );
    }
    out.push_str("</g>\n");
}

fn draw_attempt(
    out: &mut String,
    name: &str,
    a: &Attempt,
    colour: &str,
    scale: &Scale,
    end: i64,
    cy: f64,
) {
    let created = scale.x(a.created_at);
    let started = a.started_at > 0;
    let finished = a.finished_at > 0;
    let lead_end = if started { a.started_at } else { end };
    let dash = if started {
        ""
    } else {
        r#" stroke-dasharray="3 3""#
    };
    let _ = writeln!(
        out,
        r#"<line class="lead-in" x1="{created:.1}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="{LEAD_IN}" stroke-width="2"{dash}/>"#,
        scale.x(lead_end)
    );
    let _ = writeln!(
        out,
        r#"<line x1="{created:.1}" y1="{:.1}" x2="{created:.1}" y2="{:.1}" stroke="{LEAD_IN}" stroke-width="2"/>"#,
        cy - 4.0,
        cy + 4.0
    );
    let t = |at: i64| {
        if at > 0 {
            format!("{:.3} s", secs(at, scale.t0))
        } else {
            "-".to_string()
        }
    };
    let tip = format!(
        "{name}: created {}, started {}, finished {}{}",
        t(a.created_at),
        t(a.started_at),
        t(a.finished_at),
        if finished {
            format!(", exit {}", a.exit_code)
        } else {
            String::new()
        }
    );
    let (label, label_colour, label_x) = if !started {
        (
            "created, not started".to_string(),
            "#5f6368",
            scale.x(end) + 6.0,
        )
    } else {
        let x1 = scale.x(a.started_at);
        let x2 = scale
            .x(if finished { a.finished_at } else { end })
            .max(x1 + 1.0);
        let _ = writeln!(
            out,
            r#"<rect class="bar" x="{x1:.1}" y="{:.1}" width="{:.1}" height="14" rx="3" fill="{colour}"><title>{}</title></rect>"#,
            cy - 7.0,
            x2 - x1,
            escape(&tip)
        );
        if finished {
            let mut label = format!("exit {}", a.exit_code);
            if let Some(r) = &a.reported {
                let _ = write!(label, " ({r})");
            }
            // A rewritten exit is kubelet's to judge: neither colour.
            let c = match (&a.reported, a.exit_code) {
                (Some(_), _) => "#3c4043",
                (None, 0) => "#1f8a4c",
                (None, _) => "#d0342c",
            };
            (label, c, x2 + 6.0)
        } else {
            let _ = writeln!(
                out,
                r#"<path d="M{:.1},{:.1} l8,7 l-8,7 z" fill="{colour}"/>"#,
                x2,
                cy - 7.0
            );
            ("still running".to_string(), "#5f6368", x2 + 12.0)
        }
    };
    let _ = writeln!(
        out,
        r#"<text class="exit" x="{label_x:.1}" y="{:.1}" font-size="12" fill="{label_colour}">{}</text>"#,
        cy + 4.0,
        escape(&label)
    );
}

fn draw_phases(out: &mut String, run: &Run, scale: &Scale, top: f64) {
    let cy = top + 14.0;
    let _ = writeln!(out, r#"<g class="phases">"#);
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end" fill="#5f6368">pod phase</text>"##,
        LEFT - 12.0,
        cy + 4.0
    );
    let mut end_x = LEFT;
    for (i, (since, phase)) in run.phases.iter().enumerate() {
        let until = run.phases.get(i + 1).map_or(run.end, |(t, _)| *t);
        let x1 = scale.x(*since);
        let x2 = scale.x(until.max(*since));
        end_x = end_x.max(x2);
        let _ = writeln!(
            out,
            r#"<rect x="{x1:.1}" y="{:.1}" width="{:.1}" height="8" fill="{}"><title>{} from {:.2} s</title></rect>"#,
            cy - 4.0,
            (x2 - x1).max(1.0),
            phase_colour(phase),
            escape(phase),
            secs(*since, scale.t0).max(0.0)
        );
        if x2 - x1 > text_width(phase) + 6.0 && i + 1 < run.phases.len() {
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#5f6368">{}</text>"##,
                x1 + 2.0,
                cy - 7.0,
                escape(phase)
            );
        }
    }
    let outcome = run.outcome();
    let colour = phase_colour(run.phases.last().map_or("Pending", |(_, p)| p.as_str()));
    let colour = if colour.starts_with("#c") || colour.starts_with("#8") {
        "#3c4043"
    } else {
        colour
    };
    let _ = writeln!(
        out,
        r#"<text class="outcome" x="{:.1}" y="{:.1}" font-size="12" font-weight="bold" fill="{colour}">{}</text>"#,
        end_x + 6.0,
        cy + 4.0,
        escape(&outcome)
    );
    out.push_str("</g>\n");
}

fn draw_axis(out: &mut String, scale: &Scale, top: f64) {
    let step = tick_step(scale.span);
    let y = top + 4.0;
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#80868b" stroke-width="1"/>"##,
        LEFT + PLOT
    );
    let mut s = 0.0;
    while s <= scale.span + 1e-9 {
        let x = LEFT + s / scale.span * PLOT;
        let label = if step < 1.0 {
            format!("{s:.1} s")
        } else {
            format!("{s:.0} s")
        };
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{y:.1}" x2="{x:.1}" y2="{:.1}" stroke="#80868b"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#5f6368">{label}</text>"##,
            y + 4.0,
            y + 17.0
        );
        s += step;
    }
}

fn draw_legend(out: &mut String, top: f64) -> f64 {
    let y = top + 8.0;
    let _ = writeln!(out, r#"<g class="legend" font-size="11" fill="{LEAD_IN}">"#);
    let _ = writeln!(
        out,
        r##"<line x1="16" y1="{y:.1}" x2="40" y2="{y:.1}" stroke="{LEAD_IN}" stroke-width="2"/><text x="46" y="{:.1}" fill="#5f6368">created, waiting to start</text>"##,
        y + 4.0
    );
    let _ = writeln!(
        out,
        r##"<rect x="210" y="{:.1}" width="24" height="10" rx="3" fill="{APP}"/><rect x="238" y="{:.1}" width="24" height="10" rx="3" fill="{SIDECAR}"/><text x="268" y="{:.1}" fill="#5f6368">running (app, sidecar): containerd's started_at to finished_at</text>"##,
        y - 5.0,
        y - 5.0,
        y + 4.0
    );
    let _ = writeln!(
        out,
        r##"<circle cx="655" cy="{y:.1}" r="5" fill="{}"/><text x="665" y="{:.1}" fill="#5f6368">what the container recorded (its /proc/uptime)</text>"##,
        Tone::Info.colour(),
        y + 4.0
    );
    let _ = writeln!(
        out,
        r##"<text x="16" y="{:.1}" fill="#5f6368">Seconds from the pod's first container creation. Pod phase: what kubelet computes from the statuses it reads (kubelet simulator).</text>"##,
        y + 22.0
    );
    out.push_str("</g>\n");
    y + 26.0
}

/// An HTML page showing figures: each `(file, figure)` as a heading, its
/// caption and `<img src=file>`.
pub fn index_html(title: &str, intro: &str, figures: &[(String, &Figure)]) -> String {
    let mut s = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>{t}</title>\n\
         <style>body{{font-family:Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;\
         padding:0 1em;color:#202124}} img{{max-width:100%;border:1px solid #dadce0}}</style>\n\
         </head>\n<body>\n<h1>{t}</h1>\n<p>{}</p>\n",
        escape(intro),
        t = escape(title)
    );
    for (file, fig) in figures {
        let _ = write!(
            s,
            "<h2>{}</h2>\n<p>{}</p>\n<p><img src=\"{}\" alt=\"{}\"></p>\n",
            escape(&fig.title),
            escape(&fig.caption),
            escape(file),
            escape(&fig.title)
        );
    }
    s.push_str("</body>\n</html>\n");
    s
}

/// The figure as plain text (seconds from each run's first creation), for
/// a terminal.
pub fn describe(fig: &Figure) -> String {
    let mut s = format!("{}\n", fig.title);
    for run in &fig.runs {
        let t0 = run.t0();
        let t = |at: i64| {
            if at > 0 {
                format!("{:7.3}", secs(at, t0))
            } else {
                format!("{:>7}", "-")
            }
        };
        let _ = writeln!(s, "  {}: {}", run.label, run.outcome());
        for lane in &run.lanes {
            for a in &lane.attempts {
                let _ = writeln!(
                    s,
                    "    {:<10} created {} started {} finished {} {}{}",
                    lane.name,
                    t(a.created_at),
                    t(a.started_at),
                    t(a.finished_at),
                    if a.finished_at > 0 {
                        format!("exit {}", a.exit_code)
                    } else {
                        "running".to_string()
                    },
                    a.reported
                        .as_ref()
                        .map_or(String::new(), |r| format!(" ({r})"))
                );
            }
            for m in &lane.marks {
                let _ = writeln!(s, "    {:<10} {} {}", "", t(m.at), m.label);
            }
        }
        for m in &run.pod_marks {
            let _ = writeln!(s, "    {:<10} {} {}", "pod", t(m.at), m.label);
        }
        for (at, phase) in &run.phases {
            let _ = writeln!(s, "    {:<10} {} phase {phase}", "pod", t(*at));
        }
    }
    s
}
