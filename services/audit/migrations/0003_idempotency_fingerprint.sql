-- Idempotency keys remember what they were first used for. `request_hash` is
-- SHA-256 over the event as the caller sent it (`domain::fingerprint`): the
-- same (source_service, idempotency_key) with another event is refused
-- instead of being answered with the first event's result. Keys recorded
-- before this (NULL) keep answering every resend with their first result.
-- A nullable column without a default: no table rewrite.
alter table audit_idempotency add column request_hash bytea;
