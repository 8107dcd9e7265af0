"""Conversation-level adaptation: engagement signals, A/B testing of persona variants."""
