//! Durable state: the storage writer thread and its backends (D1-D3).
