-- Where each agent accepts its group coordinator's cuts (HOST:PORT, from its
-- heartbeat), so that the control plane can tell a group's coordinator where its
-- members are. Null: the agent listens for none.
ALTER TABLE machines ADD COLUMN group_listen TEXT;
