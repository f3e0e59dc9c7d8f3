use fred::clients::Pool;
use mesh_proto::ratelimit::{
    CheckRequest, CheckResponse, GetRulesRequest, GetRulesResponse, ResetRequest, ResetResponse,
    rate_limit_service_server::RateLimitService,
};
use tonic::{Request, Response, Status};

/// The gRPC API.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    #[allow(dead_code)] // used once Check is built
    redis: Pool,
}

impl Api {
    pub(crate) fn new(redis: Pool) -> Self {
        Self { redis }
    }
}

#[tonic::async_trait]
impl RateLimitService for Api {
    async fn check(&self, _req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Err(Status::unimplemented("check is not implemented yet"))
    }

    async fn reset(&self, _req: Request<ResetRequest>) -> Result<Response<ResetResponse>, Status> {
        Err(Status::unimplemented("reset is not implemented yet"))
    }

    async fn get_rules(&self, _req: Request<GetRulesRequest>) -> Result<Response<GetRulesResponse>, Status> {
        Err(Status::unimplemented("get_rules is not implemented yet"))
    }
}
