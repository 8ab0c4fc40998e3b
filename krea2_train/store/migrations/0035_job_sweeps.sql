-- When each job's seeding last swept the images table, and how long the sweep took: workers that
-- follow a job space their sweeps by these, across the whole cluster (krea2_train/store/queue.py).
CREATE TABLE job_sweeps (
    job         text PRIMARY KEY,
    swept_at    timestamptz NOT NULL,
    sweep_s     real NOT NULL CHECK (sweep_s >= 0)
);
