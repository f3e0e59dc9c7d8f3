use std::{net::SocketAddr, sync::Arc};

use mesh_db::{Db, DbError, MigrateMode};
use mesh_proto::audit::audit_service_server::AuditServiceServer;
use mesh_runtime::{AdminGuard, AuditSink, ConfigError, Need, ServeError, Server};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

use crate::{
    AuditConfig, Config,
    api::Api,
    appender::Appender,
    checkpoint::{self, Publishing, SignerKey},
    config::keys,
    store::{self, WRITER_ROLE},
    tail::Hub,
};

/// The service's schema, embedded at build time (no database needed to build).
pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Listeners could not be bound.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The database could not be prepared.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl mesh_runtime::StartFailure for StartError {
    fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }
}

/// The audit service, bound, connected and migrated, ready to serve.
#[derive(Debug)]
pub struct App {
    server: Server,
    /// Stops the background tasks when serving ends.
    stop: CancellationToken,
}

/// The NOTIFY channel of a schema's appends (at most 63 bytes, like any identifier).
pub(crate) fn channel_name(schema: &str) -> String {
    let readable = format!("{schema}.appended");
    if readable.len() <= 63 {
        readable
    } else {
        format!("audit.{}", hex::encode(&Sha256::digest(schema.as_bytes())[..16]))
    }
}

/// The checkpoint settings, the key read from its file; a key that cannot
/// be read or a directory that cannot be made is a configuration error.
fn checkpoint_publishing(config: &AuditConfig) -> Result<Option<Publishing>, ConfigError> {
    let (Some(dir), Some(key_file)) = (&config.checkpoint_dir, &config.checkpoint_key_file) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(key_file).map_err(|e| {
        ConfigError::new(keys::CHECKPOINT_KEY_FILE, format!("cannot read the key file: {}", e.kind()))
    })?;
    let key = SignerKey::parse(&text)
        .map_err(|e| ConfigError::new(keys::CHECKPOINT_KEY_FILE, format!("not a signer key: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| ConfigError::new(keys::CHECKPOINT_DIR, format!("cannot create the directory: {e}")))?;
    Ok(Some(Publishing {
        dir: dir.clone(),
        key: std::sync::Arc::new(key),
        interval: config.checkpoint_interval,
    }))
}

/// The `source.service` of the events this service records itself (refused
/// admin RPCs).
pub(crate) const SOURCE_SERVICE: &str = "mesh-audit";

/// Refused admin RPCs are appended to this service's own log, through the
/// same validation and appender as any Append.
fn own_log(appender: Appender, config: &AuditConfig) -> AuditSink {
    let (clock, skew) = (config.clock.clone(), config.max_future_skew);
    Arc::new(move |req| {
        let (appender, now) = (appender.clone(), clock.now());
        Box::pin(async move {
            let command =
                crate::domain::parse_append(req, now, skew, &crate::domain::CallContext::default())?;
            appender.append(command).await?;
            Ok(())
        })
    })
}

impl App {
    /// `mesh-audit migrate`: runs the migrations as `MESH_DATABASE_WRITE_URL`'s
    /// login (the schema owner) and exits (see [`mesh_db::migrate_command`]).
    pub async fn migrate_command() -> std::process::ExitCode {
        mesh_db::migrate_command("mesh-audit", crate::config::SCHEMA, &MIGRATOR).await
    }

    /// Binds the listeners; with `MESH_DATABASE_MIGRATE=on_start` runs the
    /// migrations on the primary as the login role (the schema owner), with
    /// `verify` only checks that the owner ran them (no DDL), waiting up to
    /// the configured timeout either way; then serves as
    /// `mesh_audit_writer`, which can append and read but never change or
    /// remove an event. Readiness follows PostgreSQL only while neither the
    /// primary nor a replica answers (Query goes on without the primary).
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let admin_server = config.server.clone();
        let mut server = Server::bind(config.server).await?;
        if config.db.migrate == MigrateMode::OnStart {
            // A pool of its own, with throwaway metrics: only the owner may migrate.
            let small = mesh_db::DbConfig {
                read_urls: Vec::new(),
                min_connections: 0,
                max_connections: 2,
                ..config.db.clone()
            };
            let owner = Db::connect(&small, "mesh-audit-migrate", &mut Registry::default())?;
            owner.migrate(&MIGRATOR, config.db.migrate_timeout).await?;
            owner.close().await;
        }
        let db = Db::connect_as(&config.db, "mesh-audit", server.registry(), WRITER_ROLE)?;
        if config.db.migrate == MigrateMode::Verify {
            db.check_migrations(&MIGRATOR, config.db.migrate_timeout, "mesh-audit migrate").await?;
        }
        let head = store::read_head(db.primary()).await.map_err(DbError::from)?;
        let sync: String = sqlx::query_scalar("show synchronous_commit")
            .fetch_one(db.primary())
            .await
            .map_err(DbError::from)?;
        if sync == "off" {
            tracing::warn!(
                "synchronous_commit is off on the primary: acknowledged appends can be lost in a crash"
            );
        }
        let channel = channel_name(config.db.schema.as_deref().unwrap_or("public"));
        let stop = CancellationToken::new();
        // Registered either way: off, the families read 0 rather than no data.
        checkpoint::start(
            db.primary().clone(),
            checkpoint_publishing(&config.audit)?,
            stop.clone(),
            server.registry(),
        );
        let appender = Appender::start(db.primary(), &config.audit, channel.clone(), server.registry());
        let hub = Hub::start(
            db.primary().clone(),
            channel,
            config.audit.tail_buffer,
            config.audit.tail_max_subscribers,
            head.last(),
            stop.clone(),
            server.registry(),
        );
        // Append, Tail and Verify need the primary; Query is served by a
        // replica, else the primary: the pod can answer while either is up.
        server.add_dependency(db.primary_check(), Need::AnyOf("postgres"));
        if let Some(replicas) = db.replica_check() {
            server.add_dependency(replicas, Need::AnyOf("postgres"));
        }
        let admin = AdminGuard::new(
            &admin_server,
            SOURCE_SERVICE,
            &[crate::api::VERIFY, crate::api::EXPORT],
            Some(own_log(appender.clone(), &config.audit)),
            server.registry(),
        );
        let api = Api::new(db, appender, hub, config.audit, server.draining(), admin);
        server.add_service(AuditServiceServer::new(api));
        Ok(Self { server, stop })
    }

    /// The gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.server.metrics_addr()
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        let _stop = self.stop.drop_guard();
        self.server.serve(shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_fit_an_identifier() {
        assert_eq!(channel_name("audit"), "audit.appended");
        let long = "s".repeat(63);
        let c = channel_name(&long);
        assert!(c.len() <= 63 && c.starts_with("audit."));
        assert_ne!(c, channel_name(&"t".repeat(63)));
    }
}
