"""Webhooks: endpoints a project registers to receive its job events, signed (Standard Webhooks), and the sender."""
