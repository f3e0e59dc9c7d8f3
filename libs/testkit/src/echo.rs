//! A plain tonic echo service: nothing but decode, (optional delay), encode.

use std::time::Duration;

use tonic::{Request, Response, Status};

#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
mod pb {
    tonic::include_proto!("mesh.testkit.echo.v1");
}

pub use pb::{
    EchoRequest, EchoResponse,
    echo_service_client::EchoServiceClient,
    echo_service_server::{EchoService, EchoServiceServer},
};

/// Encoded descriptor set of the echo proto (for reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo_descriptor.bin"));

/// The echo implementation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let req = req.into_inner();
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms))).await;
        }
        Ok(Response::new(EchoResponse { payload: req.payload }))
    }
}

/// The echo service ready to add to a server.
pub fn server() -> EchoServiceServer<Echo> {
    EchoServiceServer::new(Echo)
}
