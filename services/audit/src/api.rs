use std::pin::Pin;

use futures::Stream;
use mesh_db::Db;
use mesh_proto::audit::{
    AppendRequest, AppendResponse, AuditEvent, QueryRequest, QueryResponse, TailRequest, VerifyRequest,
    VerifyResponse, audit_service_server::AuditService,
};
use tonic::{Request, Response, Status};

/// The gRPC API.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    #[allow(dead_code)] // used once the RPCs are built
    db: Db,
}

impl Api {
    pub(crate) fn new(db: Db) -> Self {
        Self { db }
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!("{method} is not implemented yet"))
}

#[tonic::async_trait]
impl AuditService for Api {
    type TailStream = Pin<Box<dyn Stream<Item = Result<AuditEvent, Status>> + Send>>;

    async fn append(&self, _: Request<AppendRequest>) -> Result<Response<AppendResponse>, Status> {
        Err(unimplemented("append"))
    }

    async fn query(&self, _: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        Err(unimplemented("query"))
    }

    async fn tail(&self, _: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        Err(unimplemented("tail"))
    }

    async fn verify(&self, _: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        Err(unimplemented("verify"))
    }
}
