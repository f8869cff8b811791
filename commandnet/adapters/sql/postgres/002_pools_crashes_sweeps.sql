-- commandnet schema, version 2: every agent row records its pool (the repair loops only touch
-- their own pool's rows), crashes are counted, re-publishes are recorded, and each pool has one
-- sweeper at a time that also remembers how far the status resync has come.

UPDATE agents SET pool = 'default' WHERE pool IS NULL;
ALTER TABLE agents ALTER COLUMN pool SET DEFAULT 'default';
ALTER TABLE agents ALTER COLUMN pool SET NOT NULL;
-- Attempts of the current step whose worker died holding the lease (OOM kill, os._exit), and
-- whether the current lease runs alone on its worker (a death then counts as an attempt).
ALTER TABLE agents ADD COLUMN crashes integer NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN lease_alone boolean NOT NULL DEFAULT false;
-- The reconciler's last re-publish of the current step: at most one per stall period.
ALTER TABLE agents ADD COLUMN republished_at timestamptz;

-- The reconciler: a pool's running agents by age of their last change.
DROP INDEX agents_running_updated;
CREATE INDEX agents_running_updated ON agents (pool, updated_at) WHERE status = 'running';
-- The status resync: a pool's agents changed in a time window, in a stable order.
CREATE INDEX agents_pool_changed ON agents (pool, updated_at, agent_id);

-- One sweeper per pool: a lease on the pool's repair turn, and the status resync's mark.
CREATE TABLE sweeps (
    pool           text PRIMARY KEY,
    owner          text NOT NULL,
    until          timestamptz NOT NULL,
    resynced_until timestamptz
);
