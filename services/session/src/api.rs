use fred::clients::Pool;
use mesh_proto::session::{
    CreateSessionRequest, CreateSessionResponse, ListUserSessionsRequest, ListUserSessionsResponse,
    RefreshSessionRequest, RefreshSessionResponse, RevokeSessionRequest, RevokeSessionResponse,
    RevokeUserSessionsRequest, RevokeUserSessionsResponse, ValidateSessionRequest, ValidateSessionResponse,
    session_service_server::SessionService,
};
use tonic::{Request, Response, Status};

/// The gRPC API.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    #[allow(dead_code)] // used once the RPCs are built
    redis: Pool,
}

impl Api {
    pub(crate) fn new(redis: Pool) -> Self {
        Self { redis }
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!("{method} is not implemented yet"))
}

#[tonic::async_trait]
impl SessionService for Api {
    async fn create_session(
        &self,
        _: Request<CreateSessionRequest>,
    ) -> Result<Response<CreateSessionResponse>, Status> {
        Err(unimplemented("create_session"))
    }

    async fn validate_session(
        &self,
        _: Request<ValidateSessionRequest>,
    ) -> Result<Response<ValidateSessionResponse>, Status> {
        Err(unimplemented("validate_session"))
    }

    async fn refresh_session(
        &self,
        _: Request<RefreshSessionRequest>,
    ) -> Result<Response<RefreshSessionResponse>, Status> {
        Err(unimplemented("refresh_session"))
    }

    async fn revoke_session(
        &self,
        _: Request<RevokeSessionRequest>,
    ) -> Result<Response<RevokeSessionResponse>, Status> {
        Err(unimplemented("revoke_session"))
    }

    async fn revoke_user_sessions(
        &self,
        _: Request<RevokeUserSessionsRequest>,
    ) -> Result<Response<RevokeUserSessionsResponse>, Status> {
        Err(unimplemented("revoke_user_sessions"))
    }

    async fn list_user_sessions(
        &self,
        _: Request<ListUserSessionsRequest>,
    ) -> Result<Response<ListUserSessionsResponse>, Status> {
        Err(unimplemented("list_user_sessions"))
    }
}
