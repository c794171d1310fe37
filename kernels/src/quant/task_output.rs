//! The `[m, rows]` result of a product, shared out to the tasks of a
//! parallel matmul by columns: each task owns a disjoint range of the
//! columns of every row, and writes its results straight into place
//! (no `[rows, m]` buffer transposed in a pass of its own afterwards).

use std::marker::PhantomData;

/// One task's columns `first..first + columns` of a `[m, rows]` result.
/// Only [`TaskOutput::split`] makes them, from one exclusive borrow of the
/// result and with disjoint ranges, so each is the only writer of its
/// values.
pub(super) struct TaskOutput<'a> {
    ptr: *mut f32,
    rows: usize,
    m: usize,
    first: usize,
    columns: usize,
    _result: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `TaskOutput` writes only its own columns (see `split`), so
// tasks on different threads never touch the same value.
unsafe impl Send for TaskOutput<'_> {}

impl<'a> TaskOutput<'a> {
    /// The result `out` (`[m, rows]`) as tasks of `per_task` columns each
    /// (the last one shorter).
    pub(super) fn split(out: &'a mut [f32], rows: usize, m: usize, per_task: usize) -> Vec<Self> {
        assert_eq!(out.len(), rows * m, "a [m, rows] result");
        assert!(per_task > 0, "tasks of at least one column");
        let ptr = out.as_mut_ptr();
        (0..rows)
            .step_by(per_task)
            .map(|first| TaskOutput {
                ptr,
                rows,
                m,
                first,
                columns: per_task.min(rows - first),
                _result: PhantomData,
            })
            .collect()
    }

    /// The first column this task owns.
    pub(super) fn first(&self) -> usize {
        self.first
    }

    /// How many columns this task owns.
    pub(super) fn columns(&self) -> usize {
        self.columns
    }

    /// Writes `local` (`[m, columns]`, this task's results row by row)
    /// into place: one contiguous copy per row.
    pub(super) fn write_rows(&mut self, local: &[f32]) {
        assert_eq!(
            local.len(),
            self.columns * self.m,
            "one value per column and row"
        );
        for r in 0..self.m {
            // SAFETY: row `r < m` of the result holds columns
            // `first..first + columns <= rows` at `r * rows + first`, all
            // inside the `m * rows` values `split` was given, and only
            // this task writes them (`split` hands out disjoint ranges).
            let row = unsafe {
                std::slice::from_raw_parts_mut(
                    self.ptr.add(r * self.rows + self.first),
                    self.columns,
                )
            };
            row.copy_from_slice(&local[r * self.columns..(r + 1) * self.columns]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_cover_every_value_once() {
        let (rows, m) = (23, 5);
        let mut out = vec![f32::NAN; rows * m];
        let mut tasks = TaskOutput::split(&mut out, rows, m, 8);
        assert_eq!(
            tasks
                .iter()
                .map(|t| (t.first(), t.columns()))
                .collect::<Vec<_>>(),
            [(0, 8), (8, 8), (16, 7)]
        );
        for task in &mut tasks {
            // Column c, row r holds r * 100 + c.
            let local: Vec<f32> = (0..task.columns() * m)
                .map(|i| ((i / task.columns()) * 100 + task.first() + i % task.columns()) as f32)
                .collect();
            task.write_rows(&local);
        }
        drop(tasks);
        for r in 0..m {
            for c in 0..rows {
                assert_eq!(out[r * rows + c], (r * 100 + c) as f32);
            }
        }
    }
}
