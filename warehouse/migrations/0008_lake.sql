-- The lake's identity: a UUID drawn once, when the warehouse is created (or, for a lake created before this
-- table, when it is migrated). The gate store records it in its root attributes (lake_id) the first time this
-- lake writes it, so a second lake, or this lake's folder with a recreated warehouse, never writes into a gate
-- store that is not its own (xici.warehouse.lake.Lake.gates).

CREATE TABLE lake (
    lake_id    UUID      PRIMARY KEY,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

INSERT INTO lake (lake_id) VALUES (uuid());
