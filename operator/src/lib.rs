//! mapsnap-operator: the `BpfMapCheckpoint` CRD (`mapsnap.io/v1alpha1`), its controller and
//! its node agent. Checkpoint, restore and live migration of pods with their BPF maps,
//! through the kubelet checkpoint API and mapsnap-hook. See docs/API.md and docs/OPERATOR.md.
//!
//! Layout (after kube-rs/controller-rs):
//! - [`crd`]: the resource types; `crdgen` writes the CRD from them.
//! - [`reconcile`]: the decisions, pure functions of the object and the time.
//! - [`controller`]: the thin layer that runs those decisions against the API server.
//! - [`agent`] (API) and [`node`] (files, storage): the per-node agent.
//! - [`pods`], [`layout`], [`kubelet`], [`lease`]: pure helpers and small API pieces.
//! - [`metrics`], [`http`]: Prometheus metrics and the probe/metrics server.

pub mod agent;
pub mod capabilities;
pub mod ckptimage;
pub mod config;
pub mod controller;
pub mod crd;
pub mod error;
pub mod hostinstall;
pub mod http;
pub mod images;
pub mod kubelet;
pub mod layout;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod pods;
pub mod reconcile;

#[cfg(test)]
mod fakekubelet;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod schema_check;
#[cfg(test)]
mod tests;
