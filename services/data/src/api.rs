use mesh_db::Db;
use mesh_proto::data::{
    BatchRequest, BatchResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse, PutRequest,
    PutResponse, QueryRequest, QueryResponse, data_service_server::DataService,
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
impl DataService for Api {
    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        Err(unimplemented("put"))
    }

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(unimplemented("get"))
    }

    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Err(unimplemented("delete"))
    }

    async fn query(&self, _: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        Err(unimplemented("query"))
    }

    async fn batch(&self, _: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        Err(unimplemented("batch"))
    }
}
