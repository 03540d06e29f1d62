"""Data: tables from CSV/.npy/.npz bound to model arguments, and the bundled corpora."""

from jointkl.data.peoples_daily import peoples_daily, peoples_daily_split

__all__ = ["peoples_daily", "peoples_daily_split"]
