//! A stored design on SQLite, by id (the dashboard's design page). Mirrors `pg/designs.rs`.

use sqlx::Row;

use super::SqliteStore;
use crate::model::DesignId;
use crate::store::types::NewDesign;
use crate::store::StoreError;

impl SqliteStore {
    pub(crate) async fn get_design(&self, id: &DesignId) -> Result<NewDesign, StoreError> {
        let row = sqlx::query(
            "SELECT id, family, objective_kind, architecture_json, params, flops, layers, \
                 effectiveness, entropy, penalty, objective, resolution, num_classes, \
                 solver_version \
             FROM designs WHERE id = ?1",
        )
        .bind(&id.0)
        .fetch_optional(&self.reader)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "design",
            id: id.to_string(),
        })?;
        Ok(NewDesign {
            id: DesignId(row.try_get("id")?),
            family: row.try_get("family")?,
            objective_kind: row.try_get("objective_kind")?,
            architecture_json: row.try_get("architecture_json")?,
            params: row.try_get("params")?,
            flops: row.try_get("flops")?,
            layers: row.try_get("layers")?,
            effectiveness: row.try_get("effectiveness")?,
            entropy: row.try_get("entropy")?,
            penalty: row.try_get("penalty")?,
            objective: row.try_get("objective")?,
            resolution: row.try_get("resolution")?,
            num_classes: row.try_get("num_classes")?,
            solver_version: row.try_get("solver_version")?,
        })
    }
}
