//! `hack/demo`'s player: starts a private containerd with the shim in front
//! of it, plays each scenario of `tests/support/demo.rs` twice with the
//! kubelet simulator (straight against containerd, then through the shim),
//! and writes OUTDIR/<scenario>.svg (the two runs on one time axis, from
//! containerd's timestamps) and OUTDIR/index.html showing them; prints each
//! run as text.
//!
//! `cargo bench --bench demo -- [OUTDIR]` (default: target/demo), or
//! `hack/demo [OUTDIR]`, which installs what is needed first.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::path::PathBuf;

use anyhow::Context as _;
use support::demo::{figure, Scenario, Stage};
use support::timeline::{describe, index_html, render_svg};

fn main() -> anyhow::Result<()> {
    // cargo bench adds `--bench`; the one other argument is the directory.
    let out = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .unwrap_or_else(|| support::target_dir().join("demo"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = rt.block_on(async {
        let stage = Stage::start().await?;
        let mut figures = Vec::new();
        for scenario in Scenario::ALL {
            eprintln!("playing {} ...", scenario.slug());
            let fig = figure(&stage, scenario).await?;
            println!("{}", describe(&fig));
            figures.push((scenario, fig));
        }
        anyhow::Ok(figures)
    })?;
    let mut shown = Vec::new();
    for (scenario, fig) in &figures {
        let file = format!("{}.svg", scenario.slug());
        let path = out.join(&file);
        std::fs::write(&path, render_svg(fig))
            .with_context(|| format!("writing {}", path.display()))?;
        shown.push((file, fig));
    }
    let index = out.join("index.html");
    std::fs::write(
        &index,
        index_html(
            "sidecar-shim: container timelines",
            "Each scenario's pod played by a kubelet simulator twice, straight against \
             containerd and through sidecar-shim, on a private containerd. Bars are \
             containerd's own created/started/finished times; dots are moments the \
             containers recorded themselves. Regenerate with hack/demo.",
            &shown,
        ),
    )
    .with_context(|| format!("writing {}", index.display()))?;
    eprintln!("wrote {}", index.display());
    Ok(())
}
