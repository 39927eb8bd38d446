//! Issue 9: a grpc-go client (kubelet, crictl, critest) through the shim.
//!
//! A grpc-go client PINGs after DATA it receives (its BDP estimator). When
//! that DATA was an answer the shim gave itself, containerd has written
//! nothing on the connection since the previous PING and counts the PING as
//! a strike; after more than two it sends GOAWAY ENHANCE_YOUR_CALM
//! `too_many_pings` and closes the connection. That GOAWAY's last-stream-id
//! is containerd's view, which never included the streams the shim answered,
//! so the client re-sends those on a new connection (transparent retry):
//! StartContainer included, which containerd then refuses ("already in
//! starting state") and the container ends with exit 128.
//!
//! The client here is `support::grpc_go`, which behaves like grpc-go's at the
//! HTTP/2 level (see its docs for what it models and where it deviates).
//! What is judged is what a user would see: what the client received on the
//! wire (GOAWAY frames, resends, answers), containerd's own view of every
//! container (asked directly, never through the shim) and containerd's log.
//!
//! * `kubelet_like_client_keeps_one_connection_through_1000_calls`: a node
//!   as kubelet drives it, on one connection: Job pods with a sidecar that
//!   run to completion (from then on the shim rewrites their sidecars'
//!   status, so it answers every status call itself), then pods with
//!   sidecars and plain pods started by pod workers while the PLEG relists
//!   and syncs pods, then the steady state (relists, pod syncs, exec probes,
//!   housekeeping) up to 1000 calls, about half of them answered by the
//!   shim, several in flight at once. kubelet's calls come in bursts: a
//!   relist, then pod workers syncing pods at once (status calls, all
//!   answered by the shim, each answer followed by a PING), then
//!   housekeeping (relayed): the pattern that cost the connection.
//! * `pings_after_local_answers_keep_the_connection`: the mechanism alone:
//!   six answers of the shim's own, each followed by a PING, and then a
//!   relayed call on the same connection.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use k8s_cri::v1::{
    ContainerConfig, ContainerState, ContainerStatusRequest, ContainerStatusResponse,
    CreateContainerRequest, CreateContainerResponse, ExecSyncRequest, ExecSyncResponse,
    ImageFsInfoRequest, ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse,
    ListContainersRequest, ListContainersResponse, ListImagesRequest, ListImagesResponse,
    ListPodSandboxRequest, ListPodSandboxResponse, PodSandboxConfig, PodSandboxFilter,
    PodSandboxStatusRequest, PodSandboxStatusResponse, RunPodSandboxRequest, RunPodSandboxResponse,
    StartContainerRequest, StartContainerResponse, StatusRequest, StatusResponse, VersionRequest,
    VersionResponse,
};
use prost::Message;
use support::grpc_go::{
    short_method, GrpcGoClient, Options, Reply, Stats, ENHANCE_YOUR_CALM, NO_ERROR,
};
use support::*;

const VERSION: &str = "/runtime.v1.RuntimeService/Version";
const STATUS: &str = "/runtime.v1.RuntimeService/Status";
const RUN_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/RunPodSandbox";
const POD_SANDBOX_STATUS: &str = "/runtime.v1.RuntimeService/PodSandboxStatus";
const LIST_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/ListPodSandbox";
const CREATE_CONTAINER: &str = "/runtime.v1.RuntimeService/CreateContainer";
const START_CONTAINER: &str = "/runtime.v1.RuntimeService/StartContainer";
const CONTAINER_STATUS: &str = "/runtime.v1.RuntimeService/ContainerStatus";
const LIST_CONTAINERS: &str = "/runtime.v1.RuntimeService/ListContainers";
const EXEC_SYNC: &str = "/runtime.v1.RuntimeService/ExecSync";
const IMAGE_STATUS: &str = "/runtime.v1.ImageService/ImageStatus";
const LIST_IMAGES: &str = "/runtime.v1.ImageService/ListImages";
const IMAGE_FS_INFO: &str = "/runtime.v1.ImageService/ImageFsInfo";

const SIDECARS: &str = "sidecar-shim.io/sidecars";
const RESTART_POLICY: &str = "sidecar-shim.io/restart-policy";
const POD_UID: &str = "io.kubernetes.pod.uid";

/// Calls on the one connection, in all.
const TOTAL_CALLS: usize = 1000;
/// Job pods (`restart-policy: Never`) with a sidecar, run first: the app
/// exits 0 and the shim stops the sidecar, whose status it then rewrites,
/// so that from then on it answers the status calls of every pod itself.
const JOB_PODS: usize = 2;
/// Pods whose sidecar `proxy` and app keep running.
const SIDECAR_PODS: usize = 8;
/// Pods without annotations.
const PLAIN_PODS: usize = 2;
/// kubelet's pod workers starting pods at once.
const POD_WORKERS: usize = 4;
/// Pods synced per PLEG round, each by its pod worker (at once).
const SYNCS_PER_ROUND: usize = 4;
/// Exec probes per PLEG round in the steady state (concurrently with the
/// syncs).
const PROBES_PER_ROUND: usize = 1;
/// The PLEG's relist period while pods start (kubelet's is 1 s; shorter
/// here so that rounds interleave with the starts).
const RELIST_EVERY: Duration = Duration::from_millis(250);
/// While pods start, PLEG rounds stop once this many calls were made.
const START_UP_BUDGET: usize = TOTAL_CALLS / 2;
/// terminationGracePeriod of every pod.
const GRACE_SECS: u64 = 10;
/// Waits on containerd's state; generous for a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(60);
/// All calls (about 10 s here): a shim that leaves calls hanging is
/// reported before nextest's 4 minutes are up.
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(150);
/// The seed of the pod and probe picks (fixed: the same picks each run).
const SEED: u64 = 0x5eed_0009;

/// A long-running container: exits 0 on SIGTERM.
const LONG_RUNNING: &str = "trap 'exit 0' TERM; sleep 3600 & wait";

/// What a container should be in containerd at the end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Running,
    Exited(i32),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PodKind {
    Job,
    Sidecar,
    Plain,
}

struct PodPlan {
    name: String,
    kind: PodKind,
    config: PodSandboxConfig,
    /// (name, config, expected end state), in start order.
    containers: Vec<(String, ContainerConfig, Expect)>,
}

impl PodPlan {
    fn uid(&self) -> &str {
        self.config.labels.get(POD_UID).map_or("", String::as_str)
    }
}

/// What became of a pod: its sandbox id and its containers' ids.
#[derive(Default, Clone)]
struct PodRun {
    id: Option<String>,
    containers: Vec<Option<String>>,
    /// Every StartContainer was answered OK.
    started: bool,
}

fn plans(log_root: &Path) -> Vec<PodPlan> {
    let mut plans = Vec::new();
    let kinds = std::iter::repeat_n(PodKind::Job, JOB_PODS)
        .chain(std::iter::repeat_n(PodKind::Sidecar, SIDECAR_PODS))
        .chain(std::iter::repeat_n(PodKind::Plain, PLAIN_PODS));
    for (i, kind) in kinds.enumerate() {
        let name = format!(
            "{}-{i}",
            match kind {
                PodKind::Job => "job",
                PodKind::Sidecar => "sidecar",
                PodKind::Plain => "plain",
            }
        );
        let mut config = pod_sandbox_config(&name, log_root);
        if kind != PodKind::Plain {
            config
                .annotations
                .insert(SIDECARS.to_string(), "proxy".to_string());
        }
        if kind == PodKind::Job {
            config
                .annotations
                .insert(RESTART_POLICY.to_string(), "Never".to_string());
        }
        let container = |name: &str, command: Vec<String>, expect| {
            (
                name.to_string(),
                kubelet_container_config(&config, name, command, GRACE_SECS),
                expect,
            )
        };
        let containers = match kind {
            // The sidecar first: the app's start is held until it runs. The
            // shim stops the proxy once the app exited; its trap makes that
            // exit 0.
            PodKind::Job => vec![
                container("proxy", sh(LONG_RUNNING), Expect::Exited(0)),
                container("app", vec!["true".into()], Expect::Exited(0)),
            ],
            PodKind::Sidecar => vec![
                container("proxy", sh(LONG_RUNNING), Expect::Running),
                container("app", sh(LONG_RUNNING), Expect::Running),
            ],
            PodKind::Plain => vec![container("app", sh(LONG_RUNNING), Expect::Running)],
        };
        plans.push(PodPlan {
            name,
            kind,
            config,
            containers,
        });
    }
    plans
}

// ---------------------------------------------------------------------------
// The calls, recorded

/// One call as the client saw it.
struct Record {
    method: String,
    what: String,
    reply: Reply,
    /// Why the answer is not what it should be (a non-OK code, or an OK
    /// answer about something else).
    problem: Option<String>,
}

/// kubelet's side: the client and the record of every call it made.
#[derive(Clone)]
struct Kubelet {
    client: GrpcGoClient,
    records: Arc<Mutex<Vec<Record>>>,
    /// Calls made or about to be made.
    issued: Arc<AtomicUsize>,
}

impl Kubelet {
    fn new(client: GrpcGoClient) -> Kubelet {
        Kubelet {
            client,
            records: Arc::default(),
            issued: Arc::default(),
        }
    }

    /// A call that must answer OK, with an answer `check` accepts.
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        what: impl Into<String>,
        request: &Req,
        check: impl FnOnce(&Resp) -> Result<(), String>,
    ) -> Option<Resp> {
        self.issued.fetch_add(1, Ordering::Relaxed);
        self.record(method, what.into(), request, check).await
    }

    /// The same, unless `TOTAL_CALLS` calls have been made (the calls of
    /// PLEG rounds, probes and housekeeping, which fill up to the total).
    async fn call_within_budget<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        what: impl Into<String>,
        request: &Req,
        check: impl FnOnce(&Resp) -> Result<(), String>,
    ) -> Option<Resp> {
        let reserved = self
            .issued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < TOTAL_CALLS).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            return None;
        }
        self.record(method, what.into(), request, check).await
    }

    async fn record<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        what: String,
        request: &Req,
        check: impl FnOnce(&Resp) -> Result<(), String>,
    ) -> Option<Resp> {
        let (reply, resp) = self.client.call::<Req, Resp>(method, request).await;
        let problem = match &resp {
            Some(resp) => check(resp).err(),
            None => Some(format!("{:?}: {}", reply.code, reply.message)),
        };
        let ok = problem.is_none();
        self.records.lock().unwrap().push(Record {
            method: short_method(method).to_string(),
            what,
            reply,
            problem,
        });
        resp.filter(|_| ok)
    }

    fn issued(&self) -> usize {
        self.issued.load(Ordering::Relaxed)
    }

    fn budget_left(&self) -> bool {
        self.issued() < TOTAL_CALLS
    }
}

fn expect(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(why())
    }
}

fn image_status_request() -> ImageStatusRequest {
    ImageStatusRequest {
        image: Some(ImageSpec {
            image: BUSYBOX_IMAGE.to_string(),
            ..Default::default()
        }),
        verbose: false,
    }
}

fn check_version(r: &VersionResponse) -> Result<(), String> {
    expect(r.runtime_name == "containerd", || {
        format!("runtime_name {:?}", r.runtime_name)
    })
}

fn check_image(r: &ImageStatusResponse) -> Result<(), String> {
    expect(r.image.is_some(), || "no image".into())
}

// ---------------------------------------------------------------------------
// Starting pods, as a pod worker does

/// CreateContainer then StartContainer, after making sure of the image
/// (kubelet's EnsureImageExists: ImageStatus): the container's id and
/// whether it started.
async fn create_and_start(
    k: &Kubelet,
    pod: &str,
    plan: &PodPlan,
    name: &str,
    config: &ContainerConfig,
) -> Option<(String, bool)> {
    k.call(
        IMAGE_STATUS,
        BUSYBOX_IMAGE,
        &image_status_request(),
        check_image,
    )
    .await;
    let what = format!("{}/{name}", plan.name);
    let request = CreateContainerRequest {
        pod_sandbox_id: pod.to_string(),
        config: Some(config.clone()),
        sandbox_config: Some(plan.config.clone()),
    };
    let id = k
        .call(
            CREATE_CONTAINER,
            what.as_str(),
            &request,
            |r: &CreateContainerResponse| {
                expect(!r.container_id.is_empty(), || "no container id".into())
            },
        )
        .await?
        .container_id;
    let request = StartContainerRequest {
        container_id: id.clone(),
    };
    let started = k
        .call(
            START_CONTAINER,
            format!("{what} {id}"),
            &request,
            |_: &StartContainerResponse| Ok(()),
        )
        .await;
    Some((id, started.is_some()))
}

/// A pod worker's first sync of a pod: the sandbox, its status, then the
/// containers in order (stopping at the first that cannot be created, as
/// kubelet does until its next sync). The run is published in `runs[i]` as
/// it grows, for the PLEG rounds.
async fn start_pod(k: &Kubelet, plan: &PodPlan, runs: &Mutex<Vec<PodRun>>, i: usize) {
    let request = RunPodSandboxRequest {
        config: Some(plan.config.clone()),
        runtime_handler: String::new(),
    };
    let Some(resp) = k
        .call(
            RUN_POD_SANDBOX,
            plan.name.as_str(),
            &request,
            |r: &RunPodSandboxResponse| {
                expect(!r.pod_sandbox_id.is_empty(), || "no sandbox id".into())
            },
        )
        .await
    else {
        return;
    };
    let pod = resp.pod_sandbox_id;
    runs.lock().unwrap()[i].id = Some(pod.clone());
    pod_sandbox_status(k, &pod, false).await;
    let mut all_started = true;
    for (n, (name, config, _)) in plan.containers.iter().enumerate() {
        let Some((id, started)) = create_and_start(k, &pod, plan, name, config).await else {
            all_started = false;
            break;
        };
        all_started &= started;
        runs.lock().unwrap()[i].containers[n] = Some(id);
    }
    runs.lock().unwrap()[i].started = all_started;
}

/// Pod workers starting `which` pods.
async fn start_pods(
    k: &Kubelet,
    plans: &Arc<Vec<PodPlan>>,
    runs: &Arc<Mutex<Vec<PodRun>>>,
    which: Vec<usize>,
) -> Result<()> {
    let queue = Arc::new(Mutex::new(VecDeque::from(which)));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..POD_WORKERS {
        let (k, plans, runs, queue) = (k.clone(), plans.clone(), runs.clone(), queue.clone());
        workers.spawn(async move {
            loop {
                let next = queue.lock().unwrap().pop_front();
                let Some(i) = next else { break };
                start_pod(&k, &plans[i], &runs, i).await;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("pod worker")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The PLEG, pod syncs, probes, housekeeping

/// What kubelet knows of the node when a round begins.
#[derive(Clone, Default)]
struct NodeView {
    /// (sandbox id, pod uid, container ids) of the pods started so far.
    pods: Vec<(String, String, Vec<String>)>,
    /// Sidecars of long-running pods that started (exec probe targets).
    probes: Vec<String>,
}

impl NodeView {
    fn of(plans: &[PodPlan], runs: &[PodRun]) -> NodeView {
        let mut view = NodeView::default();
        for (plan, run) in plans.iter().zip(runs) {
            let Some(id) = &run.id else { continue };
            let containers: Vec<String> = run.containers.iter().flatten().cloned().collect();
            if plan.kind == PodKind::Sidecar && run.started {
                view.probes.extend(containers.first().cloned());
            }
            view.pods
                .push((id.clone(), plan.uid().to_string(), containers));
        }
        view
    }

    fn containers(&self) -> impl Iterator<Item = &String> {
        self.pods.iter().flat_map(|(_, _, c)| c)
    }
}

/// SplitMix64: a fixed, dependency-free sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Up to `n` distinct indexes below `len`.
    fn pick(&mut self, n: usize, len: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..len).collect();
        for i in (1..all.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            all.swap(i, j);
        }
        all.truncate(n);
        all
    }
}

async fn pod_sandbox_status(k: &Kubelet, id: &str, within_budget: bool) {
    let request = PodSandboxStatusRequest {
        pod_sandbox_id: id.to_string(),
        verbose: false,
    };
    let check = |r: &PodSandboxStatusResponse| {
        let got = r.status.as_ref().map(|s| s.id.as_str());
        expect(got == Some(id), || format!("the status of {got:?}"))
    };
    if within_budget {
        k.call_within_budget(POD_SANDBOX_STATUS, id, &request, check)
            .await;
    } else {
        k.call(POD_SANDBOX_STATUS, id, &request, check).await;
    }
}

/// The PLEG's relist: every sandbox, every container.
async fn relist(k: &Kubelet, view: &NodeView) {
    let request = ListPodSandboxRequest { filter: None };
    k.call_within_budget(
        LIST_POD_SANDBOX,
        "",
        &request,
        |r: &ListPodSandboxResponse| {
            let listed: HashSet<&str> = r.items.iter().map(|p| p.id.as_str()).collect();
            let missing: Vec<&String> = view
                .pods
                .iter()
                .map(|(id, _, _)| id)
                .filter(|id| !listed.contains(id.as_str()))
                .collect();
            expect(missing.is_empty(), || {
                format!("sandboxes missing from the list: {missing:?}")
            })
        },
    )
    .await;
    let request = ListContainersRequest { filter: None };
    k.call_within_budget(
        LIST_CONTAINERS,
        "",
        &request,
        |r: &ListContainersResponse| {
            let listed: HashSet<&str> = r.containers.iter().map(|c| c.id.as_str()).collect();
            let missing: Vec<&String> = view
                .containers()
                .filter(|id| !listed.contains(id.as_str()))
                .collect();
            expect(missing.is_empty(), || {
                format!("containers missing from the list: {missing:?}")
            })
        },
    )
    .await;
}

/// A pod worker's sync of a pod (kubelet's GetPodStatus): its sandbox by
/// uid, the sandbox's status, each container's status.
async fn pod_sync(k: Kubelet, pod: String, uid: String, containers: Vec<String>) {
    let request = ListPodSandboxRequest {
        filter: Some(PodSandboxFilter {
            label_selector: HashMap::from([(POD_UID.to_string(), uid.clone())]),
            ..Default::default()
        }),
    };
    k.call_within_budget(
        LIST_POD_SANDBOX,
        format!("uid {uid}"),
        &request,
        |r: &ListPodSandboxResponse| {
            let ids: Vec<&str> = r.items.iter().map(|p| p.id.as_str()).collect();
            expect(ids == [pod.as_str()], || format!("sandboxes {ids:?}"))
        },
    )
    .await;
    pod_sandbox_status(&k, &pod, true).await;
    for id in containers {
        let request = ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        };
        k.call_within_budget(
            CONTAINER_STATUS,
            id.as_str(),
            &request,
            |r: &ContainerStatusResponse| {
                let got = r.status.as_ref().map(|s| s.id.as_str());
                expect(got == Some(id.as_str()), || {
                    format!("the status of {got:?}")
                })
            },
        )
        .await;
    }
}

/// An exec probe: `true` in the container.
async fn probe(k: Kubelet, id: String) {
    let request = ExecSyncRequest {
        container_id: id.clone(),
        cmd: vec!["true".into()],
        timeout: 30,
    };
    k.call_within_budget(EXEC_SYNC, id.as_str(), &request, |r: &ExecSyncResponse| {
        expect(r.exit_code == 0, || {
            format!(
                "exit code {}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr)
            )
        })
    })
    .await;
}

/// kubelet's housekeeping, each from its own loop: runtime status, image
/// filesystem stats, image checks, version.
async fn housekeeping(k: Kubelet) {
    let mut set = tokio::task::JoinSet::new();
    let c = k.clone();
    set.spawn(async move {
        c.call_within_budget(
            STATUS,
            "",
            &StatusRequest { verbose: false },
            |r: &StatusResponse| expect(r.status.is_some(), || "no status".into()),
        )
        .await;
    });
    let c = k.clone();
    set.spawn(async move {
        c.call_within_budget(
            IMAGE_FS_INFO,
            "",
            &ImageFsInfoRequest {},
            |r: &ImageFsInfoResponse| {
                expect(!r.image_filesystems.is_empty(), || {
                    "no image filesystem".into()
                })
            },
        )
        .await;
    });
    let c = k.clone();
    set.spawn(async move {
        c.call_within_budget(
            IMAGE_STATUS,
            BUSYBOX_IMAGE,
            &image_status_request(),
            check_image,
        )
        .await;
        c.call_within_budget(
            LIST_IMAGES,
            "",
            &ListImagesRequest { filter: None },
            |r: &ListImagesResponse| {
                expect(
                    r.images
                        .iter()
                        .any(|i| i.repo_tags.iter().any(|t| t == BUSYBOX_IMAGE)),
                    || format!("{} images, none tagged {BUSYBOX_IMAGE}", r.images.len()),
                )
            },
        )
        .await;
    });
    let c = k.clone();
    set.spawn(async move {
        let request = VersionRequest {
            version: "v1".into(),
        };
        c.call_within_budget(VERSION, "", &request, check_version)
            .await;
    });
    while set.join_next().await.is_some() {}
}

/// One PLEG round as kubelet makes it: the relist, then pod workers syncing
/// pods (and exec probes) at once, then housekeeping. The status calls are
/// answered by the shim (while it rewrites a status); the relist's
/// ListPodSandbox, the syncs' ListPodSandbox by uid and housekeeping are
/// relayed: about half and half.
async fn round(k: &Kubelet, view: &NodeView, rng: &mut Rng, probes: usize) {
    relist(k, view).await;
    let mut set = tokio::task::JoinSet::new();
    for i in rng.pick(SYNCS_PER_ROUND, view.pods.len()) {
        let (pod, uid, containers) = view.pods[i].clone();
        set.spawn(pod_sync(k.clone(), pod, uid, containers));
    }
    for i in rng.pick(probes, view.probes.len()) {
        set.spawn(probe(k.clone(), view.probes[i].clone()));
    }
    while set.join_next().await.is_some() {}
    housekeeping(k.clone()).await;
}

// ---------------------------------------------------------------------------
// Judging

/// Up to `max` items, one per line, and how many more there are.
fn listed(items: &[String], max: usize) -> String {
    let mut text = items
        .iter()
        .take(max)
        .map(|i| format!("\n    {i}"))
        .collect::<String>();
    if items.len() > max {
        let _ = write!(text, "\n    ... and {} more", items.len() - max);
    }
    text
}

/// The shim's log without its debug lines: decisions, warnings, errors.
fn shim_log(shim: &ShimProcess) -> String {
    let log = shim.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The wire-level checks: no GOAWAY with an error code, no resend, one
/// connection, every PING answered, nothing out of place.
fn wire_problems(stats: &Stats) -> Vec<String> {
    let mut problems = Vec::new();
    let errors = stats.error_goaways();
    if !errors.is_empty() {
        let calm = errors
            .iter()
            .filter(|g| g.code == ENHANCE_YOUR_CALM && g.debug == "too_many_pings")
            .count();
        problems.push(format!(
            "{} GOAWAY frame(s) with an error code ({calm} ENHANCE_YOUR_CALM \"too_many_pings\"):{}",
            errors.len(),
            listed(&errors.iter().map(|g| g.to_string()).collect::<Vec<_>>(), 20)
        ));
    }
    let others: Vec<String> = stats
        .goaways
        .iter()
        .filter(|g| g.code == NO_ERROR)
        .map(|g| g.to_string())
        .collect();
    if !others.is_empty() {
        problems.push(format!(
            "{} GOAWAY NO_ERROR frame(s) (the shim was not shutting down):{}",
            others.len(),
            listed(&others, 20)
        ));
    }
    if !stats.resends.is_empty() {
        let mut by_method: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &stats.resends {
            *by_method.entry(short_method(&r.method)).or_default() += 1;
        }
        problems.push(format!(
            "{} call(s) resent on a new connection (grpc-go's transparent retry), by method {by_method:?}:{}",
            stats.resends.len(),
            listed(&stats.resends.iter().map(|r| r.to_string()).collect::<Vec<_>>(), 30)
        ));
    }
    if stats.connections != 1 {
        problems.push(format!(
            "{} connections opened, want 1; ended:{}",
            stats.connections,
            listed(&stats.closed, 10)
        ));
    } else if !stats.closed.is_empty() {
        problems.push(format!("connections ended:{}", listed(&stats.closed, 10)));
    }
    if stats.pings_outstanding != 0 {
        problems.push(format!(
            "{} PING(s) never acknowledged",
            stats.pings_outstanding
        ));
    }
    if !stats.anomalies.is_empty() {
        problems.push(format!(
            "{} anomalies on the wire:{}",
            stats.anomalies.len(),
            listed(&stats.anomalies, 20)
        ));
    }
    problems
}

/// Calls whose answer was not OK (or not about what was asked), and calls
/// that needed more than one attempt.
fn call_problems(records: &[Record]) -> Vec<String> {
    let mut problems = Vec::new();
    let failed: Vec<&Record> = records.iter().filter(|r| r.problem.is_some()).collect();
    if !failed.is_empty() {
        let mut by: BTreeMap<(String, String), usize> = BTreeMap::new();
        for r in &failed {
            *by.entry((r.method.clone(), format!("{:?}", r.reply.code)))
                .or_default() += 1;
        }
        // The pod lifecycle's calls first: they are what a user misses.
        let mut lines: Vec<(bool, String)> = failed
            .iter()
            .map(|r| {
                (
                    !matches!(
                        r.method.as_str(),
                        "RunPodSandbox" | "CreateContainer" | "StartContainer"
                    ),
                    format!(
                        "{} {}: {} (attempts (connection, stream): {:?})",
                        r.method,
                        r.what,
                        r.problem.as_deref().unwrap_or_default(),
                        r.reply.attempts
                    ),
                )
            })
            .collect();
        lines.sort_by_key(|(later, _)| *later);
        let lines: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
        problems.push(format!(
            "{} of {} calls not answered as expected (want OK); by (method, code): {by:?}{}",
            failed.len(),
            records.len(),
            listed(&lines, 25)
        ));
    }
    let multi: Vec<String> = records
        .iter()
        .filter(|r| r.reply.attempts.len() > 1)
        .map(|r| format!("{} {} {:?}", r.method, r.what, r.reply.attempts))
        .collect();
    if !multi.is_empty() {
        problems.push(format!(
            "{} call(s) sent more than once, (connection, stream) of each attempt:{}",
            multi.len(),
            listed(&multi, 25)
        ));
    }
    problems
}

/// containerd's own view (asked directly): every container the test
/// started is in the state its command gives, none failed to start (exit
/// 128, StartError), no container exists that the test did not create.
async fn containerd_problems(
    containerd: &PrivateContainerd,
    plans: &[PodPlan],
    runs: &[PodRun],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut known = HashSet::new();
    for (plan, run) in plans.iter().zip(runs) {
        if run.id.is_none() {
            problems.push(format!("pod {}: no sandbox", plan.name));
            continue;
        }
        for ((name, _, want), id) in plan.containers.iter().zip(&run.containers) {
            let Some(id) = id else {
                problems.push(format!("{}/{name}: never created", plan.name));
                continue;
            };
            known.insert(id.clone());
            let status = match containerd.container_status(id).await {
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("{}/{name} {id}: {e:#}", plan.name));
                    continue;
                }
            };
            let state = state_of(&status);
            let ok = match want {
                Expect::Running => state == ContainerState::ContainerRunning,
                Expect::Exited(code) => {
                    state == ContainerState::ContainerExited && status.exit_code == *code
                }
            };
            let start_error = status.exit_code == 128 || status.reason == "StartError";
            if !ok || start_error {
                problems.push(format!(
                    "{}/{name} {id}: containerd says {:?} exit {} reason {:?} message {:?}, want {want:?}",
                    plan.name,
                    state,
                    status.exit_code,
                    status.reason,
                    status.message
                ));
            }
        }
    }
    let (rt, _) = containerd.cri();
    match rt
        .clone()
        .list_containers(ListContainersRequest { filter: None })
        .await
    {
        Ok(list) => {
            let extra: Vec<String> = list
                .into_inner()
                .containers
                .into_iter()
                .filter(|c| !known.contains(&c.id))
                .map(|c| {
                    format!(
                        "{} {:?} {:?}",
                        c.id,
                        c.metadata.map(|m| (m.name, m.attempt)),
                        ContainerState::try_from(c.state).ok()
                    )
                })
                .collect();
            if !extra.is_empty() {
                problems.push(format!(
                    "containers in containerd the test does not know (a CreateContainer whose answer was lost, or one sent twice): {extra:?}"
                ));
            }
        }
        Err(e) => problems.push(format!("ListContainers from containerd: {e}")),
    }
    problems
}

/// containerd's log must not show a refused second start.
fn containerd_log_problems(containerd: &PrivateContainerd) -> Vec<String> {
    let log = std::fs::read_to_string(containerd.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("already in starting state"))
        .collect();
    if lines.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "containerd's log has {} line(s) with \"already in starting state\":\n    {}",
        lines.len(),
        lines
            .iter()
            .take(10)
            .map(|l| l.chars().take(400).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n    ")
    )]
}

fn report(title: &str, stats: &Stats, extra: &str, problems: &[String]) -> String {
    let mut text = format!(
        "{title}: {} problem(s)\nwire: {}\n{extra}",
        problems.len(),
        stats.summary()
    );
    for (n, p) in problems.iter().enumerate() {
        let _ = write!(text, "\n{}. {p}", n + 1);
    }
    text
}

/// Wait until no PING of the client is unacknowledged (the last BDP ping's
/// ACK may still be on its way when the last call is answered).
async fn pings_settled(client: &GrpcGoClient) {
    let c = client.clone();
    let _ = wait_for(Duration::from_secs(30), "PING ACKs", || {
        let c = c.clone();
        async move { c.stats().pings_outstanding == 0 }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Tests

/// The node's life as kubelet drives it, with milestones (what was done
/// by when) appended to `milestones` as they pass.
async fn drive(
    kubelet: &Kubelet,
    containerd: &PrivateContainerd,
    plans: &Arc<Vec<PodPlan>>,
    runs: &Arc<Mutex<Vec<PodRun>>>,
    problems: &mut Vec<String>,
    milestones: &Mutex<Vec<String>>,
) -> Result<()> {
    let started = Instant::now();
    let milestone = |what: String| {
        milestones
            .lock()
            .unwrap()
            .push(format!("{what} after {:.1?}", started.elapsed()));
    };
    let mut rng = Rng(SEED);

    // kubelet's start, and Job pods that run to completion.
    kubelet
        .call(
            VERSION,
            "",
            &VersionRequest {
                version: "v1".into(),
            },
            check_version,
        )
        .await;
    let jobs: Vec<usize> = (0..plans.len())
        .filter(|&i| plans[i].kind == PodKind::Job)
        .collect();
    start_pods(kubelet, plans, runs, jobs.clone()).await?;
    for &i in &jobs {
        let run = runs.lock().unwrap()[i].clone();
        let (true, Some(proxy)) = (run.started, run.containers[0].clone()) else {
            // Its failed calls are reported.
            continue;
        };
        // Seen in containerd directly.
        let exited = wait_for_value(
            TIMEOUT,
            &format!("{}'s proxy to exit", plans[i].name),
            || {
                let (rt, _) = containerd.cri();
                let proxy = proxy.clone();
                async move {
                    let s = container_status(&rt, &proxy).await?;
                    Ok((state_of(&s) == ContainerState::ContainerExited).then_some(()))
                }
            },
        )
        .await;
        if let Err(e) = exited {
            problems.push(format!("Job pod {}: {e:#}", plans[i].name));
        }
    }
    milestone(format!(
        "{} Job pods done ({} calls)",
        jobs.len(),
        kubelet.issued()
    ));

    // Pod workers start the other pods while the PLEG relists and syncs.
    let others: Vec<usize> = (0..plans.len())
        .filter(|&i| plans[i].kind != PodKind::Job)
        .collect();
    let starting = Arc::new(AtomicBool::new(true));
    let pleg = {
        let (k, plans, runs, starting) = (
            kubelet.clone(),
            plans.clone(),
            runs.clone(),
            starting.clone(),
        );
        let mut rng = Rng(rng.next());
        tokio::spawn(async move {
            let mut rounds = 0;
            let mut tick = tokio::time::interval(RELIST_EVERY);
            while starting.load(Ordering::Relaxed) && k.issued() < START_UP_BUDGET {
                tick.tick().await;
                let view = NodeView::of(&plans, &runs.lock().unwrap());
                round(&k, &view, &mut rng, 0).await;
                rounds += 1;
            }
            rounds
        })
    };
    let n = others.len();
    start_pods(kubelet, plans, runs, others).await?;
    starting.store(false, Ordering::Relaxed);
    let rounds = pleg.await.context("PLEG")?;
    milestone(format!(
        "{n} more pods started, with {rounds} PLEG rounds meanwhile ({} calls)",
        kubelet.issued()
    ));

    // The steady state, up to the total: rounds back to back, with probes.
    let view = NodeView::of(plans, &runs.lock().unwrap());
    let mut rounds = 0;
    while kubelet.budget_left() {
        round(kubelet, &view, &mut rng, PROBES_PER_ROUND).await;
        rounds += 1;
    }
    milestone(format!(
        "{rounds} rounds of the steady state ({} calls)",
        kubelet.issued()
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_like_client_keeps_one_connection_through_1000_calls() -> Result<()> {
    let started = Instant::now();
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    let kubelet = Kubelet::new(GrpcGoClient::new(shim.listen(), Options::default()));
    let plans = Arc::new(plans(&containerd.pod_log_root()));
    let runs = Arc::new(Mutex::new(
        plans
            .iter()
            .map(|p| PodRun {
                id: None,
                containers: vec![None; p.containers.len()],
                started: false,
            })
            .collect::<Vec<_>>(),
    ));
    let up = started.elapsed();
    let mut problems = Vec::new();
    let milestones = Mutex::new(Vec::new());
    let driven = tokio::time::timeout(
        WORKLOAD_TIMEOUT,
        drive(
            &kubelet,
            &containerd,
            &plans,
            &runs,
            &mut problems,
            &milestones,
        ),
    )
    .await;
    if driven.is_err() {
        problems.push(format!(
            "the calls did not finish within {WORKLOAD_TIMEOUT:?} ({} made)",
            kubelet.issued()
        ));
    }
    let driven_in = started.elapsed() - up;
    pings_settled(&kubelet.client).await;

    let stats = kubelet.client.stats();
    let records = std::mem::take(&mut *kubelet.records.lock().unwrap());
    let runs = runs.lock().unwrap().clone();
    if let Ok(Err(e)) = driven {
        problems.push(format!("{e:#}"));
    }
    problems.extend(wire_problems(&stats));
    if records.len() < TOTAL_CALLS {
        problems.push(format!("{} calls made, want {TOTAL_CALLS}", records.len()));
    }
    if stats.max_in_flight < 2 {
        problems.push(format!(
            "at most {} call(s) were in flight at once: the test did not exercise concurrent calls",
            stats.max_in_flight
        ));
    }
    if stats.bdp_pings_sent == 0 {
        problems.push("no BDP ping was sent: the test did not exercise PINGs".into());
    }
    problems.extend(call_problems(&records));
    problems.extend(containerd_problems(&containerd, &plans, &runs).await);
    problems.extend(containerd_log_problems(&containerd));

    let mut by_method: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        *by_method.entry(r.method.as_str()).or_default() += 1;
    }
    let local = records
        .iter()
        .filter(|r| answered_by_shim(&r.method))
        .count();
    let extra = format!(
        "calls: {}, {local} of them of methods the shim answers itself (once it rewrites a \
         status); by method {by_method:?}\n\
         time: containerd and shim up after {up:.1?}; then {}; the calls took {driven_in:.1?}, \
         all judged after {:.1?}",
        records.len(),
        milestones.lock().unwrap().join(", "),
        started.elapsed()
    );
    let text = report(
        "1000 calls of a grpc-go client through the shim",
        &stats,
        &extra,
        &problems,
    );
    kubelet.client.shutdown().await;
    if !problems.is_empty() {
        bail!(
            "{text}\n--- the shim's log (info and up), last lines ---\n{}",
            shim_log(&shim)
        );
    }
    eprintln!("{text}");
    Ok(())
}

/// Whether the shim answers calls of this method itself, by design
/// (src/lifecycle/service.rs `intercepts`: CreateContainer and
/// StartContainer always, ExecSync while some pod has sidecars, the status
/// calls while some container's status is rewritten, as the Job pods'
/// stopped sidecars' are). Only for the report: nothing is judged by it.
fn answered_by_shim(method: &str) -> bool {
    matches!(
        method,
        "CreateContainer"
            | "StartContainer"
            | "ExecSync"
            | "ListContainers"
            | "PodSandboxStatus"
            | "ContainerStatus"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_after_local_answers_keep_the_connection() -> Result<()> {
    let started = Instant::now();
    let containerd = PrivateContainerd::start().await?;
    let listen = containerd.dir().join("shim.sock");
    let shim = ShimProcess::start(&listen, containerd.socket(), &[]).await?;
    // No BDP pings: this test sends exactly one PING after each answer.
    let kubelet = Kubelet::new(GrpcGoClient::new(
        shim.listen(),
        Options {
            bdp_pings: false,
            ..Options::default()
        },
    ));

    // A relayed call first: containerd has answered on the connection.
    let config = pod_sandbox_config("pings", &containerd.pod_log_root());
    let plan = PodPlan {
        name: "pings".into(),
        kind: PodKind::Plain,
        containers: (0..3)
            .map(|n| {
                let name = format!("c{n}");
                let c = kubelet_container_config(&config, &name, sh(LONG_RUNNING), GRACE_SECS);
                (name, c, Expect::Running)
            })
            .collect(),
        config,
    };
    let request = RunPodSandboxRequest {
        config: Some(plan.config.clone()),
        runtime_handler: String::new(),
    };
    let pod = kubelet
        .call(
            RUN_POD_SANDBOX,
            "pings",
            &request,
            |_: &RunPodSandboxResponse| Ok(()),
        )
        .await
        .map(|r| r.pod_sandbox_id);
    let Some(pod) = pod else {
        let records = kubelet.records.lock().unwrap();
        bail!(
            "RunPodSandbox through the shim: {:?}",
            records.last().map(|r| &r.problem)
        );
    };

    // Six answers of the shim's own (CreateContainer and StartContainer are
    // always its own), each followed by a PING whose ACK is awaited.
    let mut problems = Vec::new();
    let mut run = PodRun {
        id: Some(pod.clone()),
        containers: Vec::new(),
        started: true,
    };
    let ping = |after: String| {
        let client = kubelet.client.clone();
        async move {
            match client.ping().await {
                Ok(_) => None,
                Err(e) => Some(format!("the PING after {after}: {e}")),
            }
        }
    };
    for (name, config, _) in &plan.containers {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(config.clone()),
            sandbox_config: Some(plan.config.clone()),
        };
        let id = kubelet
            .call(
                CREATE_CONTAINER,
                name.as_str(),
                &request,
                |r: &CreateContainerResponse| {
                    expect(!r.container_id.is_empty(), || "no container id".into())
                },
            )
            .await
            .map(|r| r.container_id);
        problems.extend(ping(format!("CreateContainer {name}")).await);
        run.containers.push(id.clone());
        let Some(id) = id else { continue };
        let request = StartContainerRequest {
            container_id: id.clone(),
        };
        kubelet
            .call(
                START_CONTAINER,
                format!("{name} {id}"),
                &request,
                |_: &StartContainerResponse| Ok(()),
            )
            .await;
        problems.extend(ping(format!("StartContainer {name}")).await);
    }

    // A relayed call on the same connection.
    let request = VersionRequest {
        version: "v1".into(),
    };
    kubelet.call(VERSION, "", &request, check_version).await;
    pings_settled(&kubelet.client).await;

    let stats = kubelet.client.stats();
    let records = std::mem::take(&mut *kubelet.records.lock().unwrap());
    problems.extend(wire_problems(&stats));
    if stats.pings_acked != 6 {
        problems.push(format!(
            "{} of the {} PINGs acknowledged, want all 6",
            stats.pings_acked, stats.pings_sent
        ));
    }
    if let Some(version) = records.last() {
        let connections: Vec<u32> = version.reply.attempts.iter().map(|a| a.0).collect();
        if connections != [1] {
            problems.push(format!(
                "the relayed Version went over connection(s) {connections:?}, want the first"
            ));
        }
    }
    problems.extend(call_problems(&records));
    problems.extend(containerd_problems(&containerd, &[plan], &[run]).await);
    problems.extend(containerd_log_problems(&containerd));
    let text = report(
        "six local answers, each followed by a PING, then a relayed call",
        &stats,
        &format!("took {:.1?}", started.elapsed()),
        &problems,
    );
    kubelet.client.shutdown().await;
    if !problems.is_empty() {
        bail!(
            "{text}\n--- the shim's log (info and up), last lines ---\n{}",
            shim_log(&shim)
        );
    }
    eprintln!("{text}");
    Ok(())
}
