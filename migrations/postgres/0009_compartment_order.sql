-- A compartment's resources in (type, id) order straight from one index: Patient/$export,
-- $everything pages and erasure read a compartment in that order. With only (tenant,
-- compartment) indexed, SQLite's planner preferred walking the primary key (already in that
-- order) through every version of the tenant to sorting a compartment's few rows: seconds per
-- patient at 70,000 resources. The new index serves everything the old one did.
CREATE INDEX resource_versions_by_compartment_order
    ON resource_versions (tenant, compartment, resource_type, resource_id);
DROP INDEX resource_versions_by_compartment;
