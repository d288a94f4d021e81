//! Writes the BpfMapCheckpoint CRD generated from the Rust types.
//!
//! `crdgen` prints it; `crdgen --write` writes `crds/bpfmapcheckpoints.yaml` and the chart's
//! copy (`charts/mapsnap/crds/bpfmapcheckpoints.yaml`), relative to the workspace root.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let yaml = mapsnap_operator::crd::crd_yaml()?;
    if std::env::args().any(|a| a == "--write") {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        for rel in mapsnap_operator::crd::CRD_FILES {
            let path = root.join(rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, &yaml)?;
            eprintln!("wrote {}", path.display());
        }
    } else {
        print!("{yaml}");
    }
    Ok(())
}
