-- commandnet schema, version 3: workflows. A step's node gets a payload (a trigger's or a
-- signal's); an agent may park until a time (wake_at) or a named signal (waiting_signal, with
-- wake_at as its timeout and timeout_node as where the timeout leads); signals sent to an agent
-- are kept until it waits for them; history rows say what made the transition.

-- The payload given to the current step's node (NULL: none, or JSON null).
ALTER TABLE agents ADD COLUMN payload jsonb;
-- Where a signal wait that ran out moves the agent (at the next step).
ALTER TABLE agents ADD COLUMN timeout_node text;

-- step (a node ran), timeout (a signal wait ran out), resume (a failed or cancelled agent
-- was run again).
ALTER TABLE history ADD COLUMN kind text NOT NULL DEFAULT 'step';

-- Signals received for an agent; consumed_step is the step whose payload it became (NULL:
-- kept until the agent waits for that name). The id makes a resent signal a no-op.
CREATE TABLE signals (
    agent_id      text NOT NULL,
    signal_id     text NOT NULL,
    name          text NOT NULL,
    payload       jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    consumed_step integer,
    PRIMARY KEY (agent_id, signal_id)
);
-- A wait finds the oldest kept signal of its name.
CREATE INDEX signals_kept ON signals (agent_id, name, created_at) WHERE consumed_step IS NULL;

-- The wake-up loop: a pool's parked agents by due time.
DROP INDEX agents_wake;
CREATE INDEX agents_wake ON agents (pool, wake_at) WHERE wake_at IS NOT NULL;

-- Fan-out and join. A branch is an agent whose parent_id names the agent that fanned out,
-- parent_step the step that fan-out moved the parent to, branch_index its place. The parent,
-- parked at its join, counts in ``joining`` the branches still running; join_step and
-- join_policy describe its last fan-out.
ALTER TABLE agents ADD COLUMN parent_step integer;
ALTER TABLE agents ADD COLUMN branch_index integer;
ALTER TABLE agents ADD COLUMN joining integer;
ALTER TABLE agents ADD COLUMN join_step integer;
ALTER TABLE agents ADD COLUMN join_policy text CHECK (join_policy IN ('fail_fast', 'collect'));
-- A join reads its branches in order; a cancel finds the running children of an agent.
DROP INDEX agents_parent;
CREATE INDEX agents_branches ON agents (parent_id, parent_step, branch_index)
    WHERE parent_id IS NOT NULL;

-- Safe deploys: the version of the graph that triggered the agent or ran its last step.
ALTER TABLE agents ADD COLUMN graph_version text;
