-- commandnet schema, version 1. Applied once, inside a transaction holding the migration lock.
-- Times are timestamptz from the database clock; the adapter returns them as epoch seconds.

CREATE TABLE agents (
    agent_id        text PRIMARY KEY,
    node            text NOT NULL,
    step            integer NOT NULL,
    status          text NOT NULL
                    CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    context         jsonb NOT NULL,
    start_node      text NOT NULL,
    initial_context jsonb NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    error           text,
    lease_owner     text,
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- Room for what is coming (all nullable, unused by version 1 of the protocol):
    pool            text,         -- the worker pool (graph) that runs the agent
    parent_id       text,         -- fan-out: the agent that spawned this branch
    join_key        text,         -- fan-out: the join node instance this branch reports to
    wake_at         timestamptz,  -- durable timers: parked until then
    waiting_signal  text          -- signals: parked until this named event arrives
);
-- Frequent updates: leave room on each page so they stay HOT (no index churn).
ALTER TABLE agents SET (fillfactor = 80);

-- The reconciler: running agents by age of their last change.
CREATE INDEX agents_running_updated ON agents (updated_at) WHERE status = 'running';
-- Fan-out and timers, ready for the features that fill them.
CREATE INDEX agents_parent ON agents (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX agents_wake ON agents (wake_at) WHERE wake_at IS NOT NULL;

-- One row per committed transition; the key makes a doubled transition impossible.
CREATE TABLE history (
    agent_id  text NOT NULL,  -- no foreign key: a trigger per commit for nothing (no deletes)
    step      integer NOT NULL,
    from_node text NOT NULL,
    to_node   text,
    attempts  integer NOT NULL,
    duration  double precision NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, step)
);

-- Step events committed with their transition and not yet known to be published.
CREATE TABLE outbox (
    agent_id   text NOT NULL,
    step       integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, step)
);
-- The sweeper: the oldest unpublished events first.
CREATE INDEX outbox_created ON outbox (created_at);
