-- Quality filters are selections too (krea2 data filter, data.quality): images whose filter
-- scores lie within bounds.
ALTER TABLE selections DROP CONSTRAINT selections_method_check;
ALTER TABLE selections ADD CONSTRAINT selections_method_check CHECK (method IN ('balance', 'curate', 'filter'));
