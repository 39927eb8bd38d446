//! The demo (`hack/demo`): its SVG timelines (`tests/support/timeline.rs`)
//! on data shaped like a real run's, and one scenario played end to end
//! against a private containerd, without and through the shim, with the
//! timeline checked against containerd's timestamps and what the containers
//! recorded themselves.

mod support;

use anyhow::{ensure, Context as _, Result};
use roxmltree::{Document, Node};
use support::demo::{play, Scenario, Stage, Via};
use support::timeline::*;

/// A moment of the Job scenario: `secs` after its first creation (the
/// numbers are those of a real run), as wall-clock nanoseconds.
fn at(secs: f64) -> i64 {
    1_764_570_000_000_000_000 + (secs * 1e9) as i64
}

fn attempt(created: f64, started: f64, finished: Option<f64>, exit_code: i32) -> Attempt {
    Attempt {
        created_at: at(created),
        started_at: at(started),
        finished_at: finished.map_or(0, at),
        exit_code,
        reported: None,
    }
}

/// The Job scenario as `hack/demo` saw it once.
fn job_figure() -> Figure {
    let phases = |changes: &[(f64, &str)]| -> Vec<(i64, String)> {
        changes
            .iter()
            .map(|&(t, p)| (at(t), p.to_string()))
            .collect()
    };
    let direct = Run {
        label: "without the shim".into(),
        lanes: vec![
            Lane {
                name: "proxy".into(),
                sidecar: true,
                attempts: vec![attempt(0.0, 0.057, None, 0)],
                marks: vec![],
            },
            Lane {
                name: "main".into(),
                sidecar: false,
                attempts: vec![attempt(0.098, 0.159, Some(2.167), 0)],
                marks: vec![],
            },
        ],
        phases: phases(&[(-0.152, "Pending"), (0.163, "Running")]),
        pod_marks: vec![],
        end: at(6.167),
        cut_off: true,
    };
    let mut proxy = attempt(0.0, 0.079, Some(2.296), 143);
    proxy.reported = Some("kubelet reads 0".into());
    let shim = Run {
        label: "with the shim".into(),
        lanes: vec![
            Lane {
                name: "proxy".into(),
                sidecar: true,
                attempts: vec![proxy],
                marks: vec![Mark {
                    at: at(2.282),
                    label: "got SIGTERM".into(),
                    tone: Tone::Info,
                }],
            },
            Lane {
                name: "main".into(),
                sidecar: false,
                attempts: vec![attempt(0.106, 0.155, Some(2.163), 0)],
                marks: vec![],
            },
        ],
        phases: phases(&[
            (-0.159, "Pending"),
            (0.167, "Running"),
            (2.980, "Succeeded"),
        ]),
        pod_marks: vec![],
        end: at(3.580),
        cut_off: false,
    };
    Figure {
        title: "Job completion".into(),
        caption: "Look at the sidecar.".into(),
        runs: vec![direct, shim],
    }
}

fn class_is<'a>(class: &'a str) -> impl Fn(&Node) -> bool + 'a {
    move |n: &Node| n.attribute("class") == Some(class)
}

fn num(n: &Node, attr: &str) -> f64 {
    n.attribute(attr)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number in {attr} of {n:?}"))
}

/// The text of every `<text>` with class `class` under `n`.
fn texts(n: Node, class: &str) -> Vec<String> {
    n.descendants()
        .filter(class_is(class))
        .map(|t| t.text().unwrap_or("").to_string())
        .collect()
}

/// The lanes of a run: (container, bars as (x, width)).
fn lanes(run: Node) -> Vec<(String, Vec<(f64, f64)>)> {
    run.descendants()
        .filter(class_is("lane"))
        .map(|l| {
            let bars = l
                .descendants()
                .filter(class_is("bar"))
                .map(|b| (num(&b, "x"), num(&b, "width")))
                .collect();
            (
                l.attribute("data-container").unwrap_or("").to_string(),
                bars,
            )
        })
        .collect()
}

#[test]
fn timeline_has_a_row_per_container_bars_to_scale_and_the_exit_codes() {
    let fig = job_figure();
    let svg = render_svg(&fig);
    let doc = Document::parse(&svg).expect("well-formed SVG");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    assert!(num(&root, "height") > 100.0);

    let runs: Vec<Node> = root.descendants().filter(class_is("run")).collect();
    let labels: Vec<&str> = runs
        .iter()
        .map(|r| r.attribute("data-label").unwrap())
        .collect();
    assert_eq!(labels, ["without the shim", "with the shim"]);
    let direct = lanes(runs[0]);
    let shim = lanes(runs[1]);
    for run in [&direct, &shim] {
        let names: Vec<&str> = run.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["proxy", "main"],
            "one row per container, spec order"
        );
        assert!(run.iter().all(|(_, bars)| bars.len() == 1), "{run:?}");
    }
    assert_eq!(
        texts(runs[0], "exit"),
        ["still running", "exit 0"],
        "the sidecar still runs at the cut-off"
    );
    assert_eq!(
        texts(runs[1], "exit"),
        ["exit 143 (kubelet reads 0)", "exit 0"]
    );
    assert_eq!(texts(runs[0], "outcome"), ["Running at cut-off"]);
    assert_eq!(texts(runs[1], "outcome"), ["Succeeded"]);
    assert!(svg.contains(">cut-off<"), "no cut-off line");
    assert!(svg.contains(">got SIGTERM<"), "no mark label");

    // To scale, on one axis for both runs: widths in proportion to the
    // durations, and starts in order of started_at.
    let width = |run: &[(String, Vec<(f64, f64)>)], i: usize| run[i].1[0].1;
    let x = |run: &[(String, Vec<(f64, f64)>)], i: usize| run[i].1[0].0;
    let main_direct = 2.167 - 0.159;
    let main_shim = 2.163 - 0.155;
    let proxy_shim = 2.296 - 0.079;
    let ratio = width(&shim, 1) / width(&shim, 0);
    assert!(
        (ratio - main_shim / proxy_shim).abs() < 0.01,
        "main/proxy bar widths {ratio}, durations {}",
        main_shim / proxy_shim
    );
    let across = width(&direct, 1) / width(&shim, 1);
    assert!(
        (across - main_direct / main_shim).abs() < 0.01,
        "main's bars {across}, durations {}",
        main_direct / main_shim
    );
    assert!(x(&shim, 0) < x(&shim, 1), "proxy started first");
    // The sidecar without the shim runs to the cut-off (6.167 s) on the same
    // scale: about three times as long as main.
    let long = width(&direct, 0) / width(&direct, 1);
    assert!(
        (long - (6.167 - 0.057) / main_direct).abs() < 0.01,
        "{long}"
    );
}

#[test]
fn timeline_escapes_text_and_draws_a_container_that_never_started() {
    let mut fig = job_figure();
    fig.title = "a <b> & \"c\"".into();
    let lane = &mut fig.runs[0].lanes[1];
    lane.name = "m<a>in".into();
    lane.attempts = vec![Attempt {
        created_at: at(0.1),
        started_at: 0,
        finished_at: 0,
        exit_code: 0,
        reported: None,
    }];
    lane.marks.push(Mark {
        at: at(1.0),
        label: "it's <odd> & \"quoted\"".into(),
        tone: Tone::Bad,
    });
    let svg = render_svg(&fig);
    let doc = Document::parse(&svg).expect("well-formed SVG");
    let run = doc
        .root_element()
        .descendants()
        .find(class_is("run"))
        .unwrap();
    let rows = lanes(run);
    assert_eq!(rows[1].0, "m<a>in");
    assert!(rows[1].1.is_empty(), "a bar for a container never started");
    assert_eq!(
        texts(run, "exit"),
        ["still running", "created, not started"]
    );
    assert!(doc
        .descendants()
        .any(|n| n.text() == Some("it's <odd> & \"quoted\"")));
    assert!(doc.descendants().any(|n| n.text() == Some("a <b> & \"c\"")));

    let html = index_html("t & t", "intro <x>", &[("job.svg".into(), &fig)]);
    assert!(html.contains("<img src=\"job.svg\""), "{html}");
    assert!(html.contains("intro &lt;x&gt;") && html.contains("<h1>t &amp; t</h1>"));
}

/// Allowed between a moment a container recorded (/proc/uptime, rounded
/// down to 10 ms) and containerd's timestamps.
const SLACK: i64 = 20_000_000;

/// The app-first scenario both ways on a real containerd: the timeline
/// holds containerd's timestamps and the containers' own marks, and the SVG
/// shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_first_timeline_shows_containerds_start_order_both_ways() -> Result<()> {
    let stage = Stage::start().await?;
    let direct = play(&stage, Scenario::AppFirst, Via::Containerd).await?;
    let shim = play(&stage, Scenario::AppFirst, Via::Shim).await?;
    eprintln!(
        "{}",
        describe(&Figure {
            title: "app-first".into(),
            caption: String::new(),
            runs: vec![direct.clone(), shim.clone()]
        })
    );

    let lane = |run: &Run, name: &str| -> Result<(Attempt, Vec<Mark>)> {
        let lane = run.lane(name).with_context(|| format!("no row {name}"))?;
        ensure!(lane.attempts.len() == 1, "{name}: {:?}", lane.attempts);
        Ok((lane.attempts[0].clone(), lane.marks.clone()))
    };
    for (run, connect, through_shim) in [
        (&direct, "connect failed", false),
        (&shim, "connected to sidecar", true),
    ] {
        let (app, app_marks) = lane(run, "app")?;
        let (proxy, proxy_marks) = lane(run, "proxy")?;
        let label = &run.label;
        // Each container recorded its moments after containerd created it
        // (its command runs only once started; containerd notes started_at
        // when runc's start returns, which may be after the first commands
        // ran) and before the end of the observation.
        for (c, marks) in [(&app, &app_marks), (&proxy, &proxy_marks)] {
            ensure!(
                c.started_at > c.created_at && c.finished_at == 0,
                "{label}: {c:?}"
            );
            for m in marks {
                ensure!(
                    m.at >= c.created_at - SLACK && m.at <= run.end,
                    "{label}: {m:?} outside {c:?} .. {}",
                    run.end
                );
            }
        }
        let marks: Vec<&str> = app_marks.iter().map(|m| m.label.as_str()).collect();
        ensure!(marks == [connect], "{label}: app recorded {marks:?}");
        let listening = proxy_marks
            .iter()
            .find(|m| m.label == "listening")
            .with_context(|| format!("{label}: proxy never listened"))?;
        if through_shim {
            // The shim started the app only once the port was open.
            ensure!(
                app.started_at > proxy.started_at
                    && app.started_at >= listening.at - SLACK
                    && app_marks[0].at >= listening.at,
                "{label}: app started at {}, proxy at {}, listening at {}",
                app.started_at,
                proxy.started_at,
                listening.at
            );
            // Created in spec order: the app first, waiting.
            ensure!(app.created_at < proxy.created_at, "{label}");
        } else {
            ensure!(
                app.started_at < proxy.started_at && app_marks[0].at < listening.at,
                "{label}: app started at {}, proxy at {}",
                app.started_at,
                proxy.started_at
            );
        }
        ensure!(
            run.cut_off && run.outcome() == "Running at cut-off",
            "{label}"
        );
    }

    // The picture: both rows in both runs, bars in containerd's start order,
    // the app's start after the sidecar's "listening" only with the shim.
    let fig = Figure {
        title: Scenario::AppFirst.title().into(),
        caption: Scenario::AppFirst.look_at().into(),
        runs: vec![direct, shim],
    };
    let svg = render_svg(&fig);
    let doc = Document::parse(&svg).context("well-formed SVG")?;
    let runs: Vec<Node> = doc.descendants().filter(class_is("run")).collect();
    ensure!(runs.len() == 2);
    for (i, run) in runs.iter().enumerate() {
        let rows = lanes(*run);
        let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
        ensure!(names == ["app", "proxy"], "{names:?}");
        let app_x = rows[0].1[0].0;
        let proxy_x = rows[1].1[0].0;
        let listening_x = run
            .descendants()
            .filter(class_is("lane"))
            .nth(1)
            .and_then(|l| l.descendants().find(|n| n.has_tag_name("circle")))
            .map(|c| num(&c, "cx"))
            .context("no mark on the proxy's row")?;
        if i == 0 {
            ensure!(
                app_x < proxy_x && app_x < listening_x,
                "{app_x} {proxy_x} {listening_x}"
            );
        } else {
            ensure!(
                app_x > proxy_x && app_x >= listening_x - 2.0,
                "{app_x} {proxy_x} {listening_x}"
            );
        }
    }
    Ok(())
}
