//! A slow image registry on loopback: serves the test busybox image (the
//! OCI layout in `busybox.tar`) over the OCI distribution API, plain HTTP on
//! 127.0.0.1 (containerd pulls from loopback registries without TLS), and
//! holds every blob download for a set time: a first pull of a large image
//! on a real node, in seconds.
//!
//! Only what a pull needs: `GET /v2/`, `GET`/`HEAD` of the manifest (by tag
//! or digest) and of blobs. Anything else is a 404.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

pub struct SlowRegistry {
    addr: std::net::SocketAddr,
    blobs_served: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct Content {
    manifest: String,
    manifest_digest: String,
    /// "sha256:HEX" → bytes (the manifest's own digest included).
    blobs: HashMap<String, Vec<u8>>,
    delay: Duration,
}

impl SlowRegistry {
    /// Serve the test busybox image, holding each blob download `delay`.
    pub async fn start(delay: Duration) -> Result<SlowRegistry> {
        let archive = super::test_images()?.join("busybox.tar");
        let dir = tempfile::tempdir()?;
        let out = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(dir.path())
            .output()
            .context("running tar")?;
        anyhow::ensure!(
            out.status.success(),
            "tar -xf {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let content = Arc::new(read_layout(dir.path(), delay)?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let blobs_served = Arc::new(AtomicUsize::new(0));
        let served = blobs_served.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, content.clone(), served.clone()));
            }
        });
        Ok(SlowRegistry {
            addr,
            blobs_served,
            task,
        })
    }

    /// An image reference for the busybox image on this registry.
    pub fn image(&self, tag: &str) -> String {
        format!("{}/sidecar-shim/busybox:{tag}", self.addr)
    }

    /// Blob downloads answered so far (config and layers).
    pub fn blobs_served(&self) -> usize {
        self.blobs_served.load(Ordering::Relaxed)
    }
}

impl Drop for SlowRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The image of the layout under `dir`, with a config of its own (a label
/// unique to this registry): containerd already holds the test image's
/// blobs, and a pull fetches only what it lacks, so without a new config it
/// would fetch nothing but the manifest.
fn read_layout(dir: &Path, delay: Duration) -> Result<Content> {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json names no manifest")?;
    let mut blobs = HashMap::new();
    for entry in std::fs::read_dir(dir.join("blobs/sha256"))? {
        let entry = entry?;
        let name = format!("sha256:{}", entry.file_name().to_string_lossy());
        blobs.insert(name, std::fs::read(entry.path())?);
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(blobs.get(digest).context("manifest blob missing")?)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("manifest names no config")?;
    let mut config: serde_json::Value =
        serde_json::from_slice(blobs.get(config_digest).context("config blob missing")?)?;
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    config["config"]["Labels"]["sidecar-shim.test/registry"] = unique.into();
    let config = serde_json::to_vec(&config)?;
    let config_digest = sha256(&config)?;
    manifest["config"]["digest"] = config_digest.clone().into();
    manifest["config"]["size"] = config.len().into();
    blobs.insert(config_digest, config);
    let manifest = serde_json::to_string(&manifest)?;
    let manifest_digest = sha256(manifest.as_bytes())?;
    Ok(Content {
        manifest,
        manifest_digest,
        blobs,
        delay,
    })
}

/// "sha256:HEX" of `data` (coreutils' sha256sum).
fn sha256(data: &[u8]) -> Result<String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    child.stdin.take().context("stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    let hex = String::from_utf8(out.stdout)?;
    let hex = hex
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?;
    Ok(format!("sha256:{hex}"))
}

async fn serve(mut conn: TcpStream, content: Arc<Content>, served: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    loop {
        // One request head (a pull sends no bodies).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let (status, kind, body, digest): (&str, &str, &[u8], Option<String>) = if path == "/v2/" {
            ("200 OK", "application/json", b"{}", None)
        } else if let Some((_, reference)) = path.rsplit_once("/manifests/") {
            let digest = &content.manifest_digest;
            if reference.starts_with("sha256:") && reference != digest {
                ("404 Not Found", "text/plain", b"", None)
            } else {
                let body = content.manifest.as_bytes();
                ("200 OK", MANIFEST_TYPE, body, Some(digest.clone()))
            }
        } else if let Some((_, digest)) = path.rsplit_once("/blobs/") {
            match content.blobs.get(digest) {
                Some(b) => {
                    if method == "GET" {
                        tokio::time::sleep(content.delay).await;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    (
                        "200 OK",
                        "application/octet-stream",
                        b.as_slice(),
                        Some(digest.to_string()),
                    )
                }
                None => ("404 Not Found", "text/plain", b"", None),
            }
        } else {
            ("404 Not Found", "text/plain", b"", None)
        };
        let mut reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(d) = digest {
            reply.push_str(&format!("Docker-Content-Digest: {d}\r\n"));
        }
        reply.push_str("\r\n");
        let mut out = reply.into_bytes();
        if method != "HEAD" {
            out.extend_from_slice(body);
        }
        if conn.write_all(&out).await.is_err() {
            return;
        }
    }
}
