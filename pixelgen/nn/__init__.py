"""Shared neural-network building blocks: attention masks, attention and transformer stacks."""
