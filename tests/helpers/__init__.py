"""Shared test utilities (tiny random checkpoints and tokenizers); no tests live here."""
