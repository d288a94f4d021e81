//! Signed and encrypted snapshots: minisign signatures and age encryption.
