//! Print the runtime's Version through a CRI socket: `cri_version SOCKET`.
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Endpoint;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).expect("usage: cri_version SOCKET");
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await?;
    let mut client = RuntimeServiceClient::new(channel);
    for _ in 0..3 {
        let v = client.version(k8s_cri::v1::VersionRequest::default()).await;
        println!("{v:?}");
        let l = client.list_containers(k8s_cri::v1::ListContainersRequest::default()).await;
        println!("{:?}", l.map(|r| r.into_inner().containers.len()));
    }
    Ok(())
}
