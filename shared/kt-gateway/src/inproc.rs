//! In-process workers: a `tonic` [`Channel`] to a `WorkerServer` in the same process, over
//! an in-memory pipe instead of a socket, so that `kt serve` runs the gateway and its workers
//! in one process with the very code paths the separate services use.

use std::io;

use hyper_util::rt::TokioIo;
use kt_proto::v1::worker_server::{Worker, WorkerServer};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tower::service_fn;

/// Bytes buffered in each direction of the pipe.
const PIPE_BYTES: usize = 1 << 20;

/// A channel to `server`, served in this process. Every connection the channel makes (it
/// reconnects as a TCP channel would) is a fresh [`tokio::io::duplex`] pipe whose other end
/// the spawned server accepts. Must be called inside a tokio runtime; the server task ends
/// when the returned channel and all its clones are dropped.
///
/// ```no_run
/// # async fn f(my_worker: kt_gateway::sim::SimWorker) {
/// use kt_proto::v1::worker_server::WorkerServer;
/// let channel = kt_gateway::in_process_channel(WorkerServer::new(my_worker));
/// # let _ = channel;
/// # }
/// ```
pub fn in_process_channel<W: Worker>(server: WorkerServer<W>) -> Channel {
    let (tx, rx) = mpsc::unbounded_channel::<DuplexStream>();
    let incoming = UnboundedReceiverStream::new(rx).map(Ok::<_, io::Error>);
    tokio::spawn(async move {
        if let Err(e) = Server::builder().add_service(server).serve_with_incoming(incoming).await {
            tracing::error!("in-process worker server stopped: {e}");
        }
    });
    // The URI is never resolved; the connector below makes every connection.
    Endpoint::from_static("http://in-process.kt").connect_with_connector_lazy(service_fn(
        move |_: Uri| {
            let tx = tx.clone();
            async move {
                let (client, server) = tokio::io::duplex(PIPE_BYTES);
                tx.send(server).map_err(|_| io::Error::other("in-process worker has stopped"))?;
                Ok::<_, io::Error>(TokioIo::new(client))
            }
        },
    ))
}
