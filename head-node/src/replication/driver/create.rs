//! Creating a volume's description when its group starts without one.

use super::VolumeTemplate;
use crate::sleds::SledPool;
use crate::volume::VolumeSpec;
use common::ids::VolumeId;

/// Places a new volume over the sleds this node reaches.
pub(super) async fn create_spec(pool: &SledPool, t: &VolumeTemplate) -> Result<VolumeSpec, String> {
    let reached = pool.discover().await;
    if reached.is_empty() {
        return Err("no sled reachable".into());
    }
    let mut chunk = None;
    for (_, conn) in &reached {
        if let Ok(c) = conn.client().await
            && let Ok(st) = c.stat().await
            && let Some(d) = st.devices.first()
        {
            chunk = Some(d.chunk_size);
            break;
        }
    }
    let chunk = chunk.ok_or("no sled reported its chunk size")?;
    let ids: Vec<_> = reached.iter().map(|(id, _)| *id).collect();
    let replicas = t.replicas.min(ids.len());
    VolumeSpec::place(VolumeId::random(), &t.name, t.size, chunk, &ids, replicas)
        .map_err(|e| e.to_string())
}
