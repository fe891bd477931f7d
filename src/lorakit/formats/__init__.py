"""Readers and writers of adapter files."""
