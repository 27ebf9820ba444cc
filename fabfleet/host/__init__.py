"""Operations on one host, each a function of a connection: the file trees
(:mod:`.files`), push, gather, facts (check-env, top), work dirs, runs and their specs,
detached jobs, the per-host slot limit, pooled payload workers and the payload API."""
