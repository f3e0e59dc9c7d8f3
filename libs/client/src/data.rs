//! [`DataClient`]: `mesh.data.v1.DataService`.

use mesh_proto::data::{
    BatchRequest, BatchResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse, PutRequest,
    PutResponse, QueryRequest, QueryResponse, data_service_client::DataServiceClient,
};
use mesh_runtime::ConfigError;
use mesh_tower::ClientMetrics;
use secrecy::{ExposeSecret, SecretString};
use tonic::{
    IntoRequest, Request, Status,
    metadata::{Ascii, MetadataValue},
};

use crate::{Channel, ClientConfig, config::keys};

/// Client of the data service. Every call needs a session token: set one
/// for all calls with [`DataClient::with_token`], or put
/// `authorization: Bearer …` in a request's metadata.
///
/// `Get` and `Query` are repeated on UNAVAILABLE; writes only when they never
/// reached a server (a repeated `Put` would bump the version twice).
#[derive(Clone)]
pub struct DataClient {
    channel: Channel,
    authorization: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for DataClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataClient")
            .field("channel", &self.channel)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A session token that cannot be sent as a header value.
#[derive(Debug, thiserror::Error)]
#[error("the session token is not a valid header value")]
pub struct InvalidToken;

impl DataClient {
    /// Methods safe to repeat after they reached a server.
    pub const IDEMPOTENT: &[&str] = &["/mesh.data.v1.DataService/Get", "/mesh.data.v1.DataService/Query"];

    /// A client for `MESH_DATA_ADDR` (required), recording into `metrics`.
    /// Call inside a Tokio runtime.
    pub fn from_config(config: &ClientConfig, metrics: &ClientMetrics) -> Result<Self, ConfigError> {
        Ok(Self::new(config.channel("data", &config.data, keys::DATA_ADDR, metrics, Self::IDEMPOTENT)?))
    }

    /// A client over an existing channel.
    pub fn new(channel: Channel) -> Self {
        Self { channel, authorization: None }
    }

    /// A client sending `token` with every call (as a sensitive header: kept
    /// out of HPACK tables and `Debug` output).
    pub fn with_token(&self, token: &SecretString) -> Result<Self, InvalidToken> {
        let mut v =
            MetadataValue::try_from(format!("Bearer {}", token.expose_secret())).map_err(|_| InvalidToken)?;
        v.set_sensitive(true);
        Ok(Self { channel: self.channel.clone(), authorization: Some(v) })
    }

    /// The channel (endpoints and their breakers' states).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The generated client, for response metadata (`x-mesh-served-by`) or
    /// options; send it requests made with [`DataClient::authorize`].
    pub fn raw(&self) -> DataServiceClient<Channel> {
        DataServiceClient::new(self.channel.clone())
    }

    /// `request` with this client's `authorization` (unless it has one).
    pub fn authorize<T>(&self, request: impl IntoRequest<T>) -> Request<T> {
        let mut request = request.into_request();
        if let Some(v) = &self.authorization
            && !request.metadata().contains_key("authorization")
        {
            request.metadata_mut().insert("authorization", v.clone());
        }
        request
    }

    /// `Put`: creates or replaces a document, optionally at an expected version.
    pub async fn put(&self, request: impl IntoRequest<PutRequest>) -> Result<PutResponse, Status> {
        Ok(self.raw().put(self.authorize(request)).await?.into_inner())
    }

    /// `Get`: reads a document.
    pub async fn get(&self, request: impl IntoRequest<GetRequest>) -> Result<GetResponse, Status> {
        Ok(self.raw().get(self.authorize(request)).await?.into_inner())
    }

    /// `Delete`: removes a document, optionally at an expected version.
    pub async fn delete(&self, request: impl IntoRequest<DeleteRequest>) -> Result<DeleteResponse, Status> {
        Ok(self.raw().delete(self.authorize(request)).await?.into_inner())
    }

    /// `Query`: a page of the documents containing a filter.
    pub async fn query(&self, request: impl IntoRequest<QueryRequest>) -> Result<QueryResponse, Status> {
        Ok(self.raw().query(self.authorize(request)).await?.into_inner())
    }

    /// `Batch`: several writes, all or nothing.
    pub async fn batch(&self, request: impl IntoRequest<BatchRequest>) -> Result<BatchResponse, Status> {
        Ok(self.raw().batch(self.authorize(request)).await?.into_inner())
    }
}
