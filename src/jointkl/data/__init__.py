"""Data: tables from CSV/.npy/.npz bound to model arguments, and the bundled corpora."""

from jointkl.data.digits import digits
from jointkl.data.peoples_daily import peoples_daily, peoples_daily_split
from jointkl.data.tables import Table, bind_arguments, load_table

__all__ = [
    "digits",
    "peoples_daily",
    "peoples_daily_split",
    "Table",
    "load_table",
    "bind_arguments",
]
