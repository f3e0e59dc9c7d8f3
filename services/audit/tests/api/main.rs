//! Integration tests of the audit service against the real PostgreSQL primary and replica.

mod append;
mod authz;
mod bad_input;
mod bounds;
mod checkpoints;
mod command_line;
mod export;
mod helpers;
mod lifecycle;
mod numbers;
mod overload;
mod query;
mod roles;
// Shared with data's tests: roles.sql run with this test's own names.
#[path = "../../../data/tests/api/pg_roles.rs"]
mod pg_roles;
mod spans;
mod storage;
mod tail;
