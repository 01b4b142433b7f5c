"""Privacy of a distilled set: the audit (nearest real neighbours, membership inference) and the
shareable package with its datasheet and the guard that refuses to package real patches."""

from histodistill.privacy.audit import AuditConfig, audit, privacy_audit

__all__ = ["AuditConfig", "audit", "privacy_audit"]
