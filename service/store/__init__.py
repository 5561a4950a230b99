"""The chat store: chats and messages."""
