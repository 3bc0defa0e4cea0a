"""Masks for personal data in logs: enough to recognise, not enough to identify."""

from __future__ import annotations


def mask_email(email: str) -> str:
    """`jane.doe@example.com` -> `j***@example.com`."""
    local, at, domain = email.partition("@")
    if not at:
        return mask_text(email)
    return f"{local[:1]}***@{domain}"


def mask_phone(phone: str) -> str:
    """`+14155550100` -> `+1*******100` (country code and last three digits)."""
    if len(phone) < 10:  # too short to show anything but its length
        return "*" * len(phone)
    return f"{phone[:2]}{'*' * (len(phone) - 5)}{phone[-3:]}"


def mask_text(text: str) -> str:
    return f"{text[:1]}***" if text else ""


def mask_identifier(kind: str, value: str) -> str:
    if kind == "email":
        return mask_email(value)
    if kind == "phone":
        return mask_phone(value)
    return value  # external ids are pseudonymous by design
