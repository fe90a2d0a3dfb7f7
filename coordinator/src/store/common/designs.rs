//! A stored design, by id (the dashboard's design page).

use crate::model::DesignId;
use crate::store::sql::{Arg, Db};
use crate::store::types::NewDesign;
use crate::store::StoreError;

#[derive(sqlx::FromRow)]
struct DesignRow {
    id: String,
    family: String,
    objective_kind: String,
    architecture_json: String,
    params: i64,
    flops: i64,
    layers: i32,
    effectiveness: f64,
    entropy: f64,
    penalty: f64,
    objective: f64,
    resolution: i32,
    num_classes: i32,
    solver_version: String,
}

pub(crate) async fn get_design(db: &mut Db<'_>, id: &DesignId) -> Result<NewDesign, StoreError> {
    // The architecture is a `json` column on PostgreSQL and TEXT on SQLite: both read as text.
    let row: DesignRow = db
        .fetch_optional(
            "SELECT id, family, objective_kind, \
                 CAST(architecture_json AS text) AS architecture_json, params, flops, layers, \
                 effectiveness, entropy, penalty, objective, resolution, num_classes, \
                 solver_version \
             FROM designs WHERE id = $1",
            &[Arg::Text(&id.0)],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "design",
            id: id.to_string(),
        })?;
    Ok(NewDesign {
        id: DesignId(row.id),
        family: row.family,
        objective_kind: row.objective_kind,
        architecture_json: row.architecture_json,
        params: row.params,
        flops: row.flops,
        layers: row.layers,
        effectiveness: row.effectiveness,
        entropy: row.entropy,
        penalty: row.penalty,
        objective: row.objective,
        resolution: row.resolution,
        num_classes: row.num_classes,
        solver_version: row.solver_version,
    })
}
