-- A queue scoped to some datasets (a training run's data-prep workers) claims and counts its own
-- rows through an index instead of walking every pending row of the job: with a large dataset's
-- 768k rows pending ahead of it, each scoped claim took 1.34 s. job_runs carries its image's
-- dataset, filled in by the database on insert (an image never changes dataset), so every
-- writer of job_runs, present or future, gets it right.

ALTER TABLE job_runs ADD COLUMN dataset_id int;

UPDATE job_runs j SET dataset_id = i.dataset_id FROM images i WHERE i.id = j.image_id;

ALTER TABLE job_runs ALTER COLUMN dataset_id SET NOT NULL;

CREATE FUNCTION job_runs_set_dataset_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT dataset_id INTO NEW.dataset_id FROM images WHERE id = NEW.image_id;
    RETURN NEW;
END
$$;

CREATE TRIGGER job_runs_dataset_id BEFORE INSERT ON job_runs
    FOR EACH ROW EXECUTE FUNCTION job_runs_set_dataset_id();

CREATE INDEX job_runs_claimable_by_dataset ON job_runs (job, dataset_id, batch_limit, last_tried_at NULLS FIRST)
    WHERE state = 'pending';
