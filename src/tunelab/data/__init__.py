"""Data: read rows from files or the hub, turn them into chats or text, tokenise with loss masks, batch."""
