//! The `[m, rows]` result of a product, shared out to the tasks of a
//! parallel matmul by columns: each task owns a disjoint range of the
//! columns of every row, and writes its results straight into place
//! (no `[rows, m]` buffer transposed in a pass of its own afterwards).
//! The result starts uninitialized: the tasks together write all of it,
//! so zeroing it first would be a pass over memory for nothing.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

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
    _result: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: a `TaskOutput` writes only its own columns (see `split`), so
// tasks on different threads never touch the same value.
unsafe impl Send for TaskOutput<'_> {}

impl<'a> TaskOutput<'a> {
    /// The result `out` (`[m, rows]`) as tasks of `per_task` columns each
    /// (the last one shorter).
    pub(super) fn split(
        out: &'a mut [MaybeUninit<f32>],
        rows: usize,
        m: usize,
        per_task: usize,
    ) -> Vec<Self> {
        assert!(out.len() >= rows * m, "room for a [m, rows] result");
        assert!(per_task > 0, "tasks of at least one column");
        let ptr = out.as_mut_ptr().cast::<f32>();
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
        for (r, values) in local.chunks_exact(self.columns).enumerate() {
            // SAFETY: row `r < m` of the result holds columns
            // `first..first + columns <= rows` at `r * rows + first`, all
            // inside the `m * rows` values `split` was given, and only
            // this task writes them (`split` hands out disjoint ranges).
            // They may be uninitialized: they are written, never read.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    values.as_ptr(),
                    self.ptr.add(r * self.rows + self.first),
                    self.columns,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_cover_every_value_once() {
        let (rows, m) = (23, 5);
        // NaN where no task wrote: the result's memory, seen as the
        // uninitialized values `split` takes (only f32s are written to it).
        let mut out = vec![f32::NAN; rows * m];
        // SAFETY: `MaybeUninit<f32>` has the layout of `f32`.
        let uninit = unsafe { &mut *(out.as_mut_slice() as *mut [f32] as *mut [MaybeUninit<f32>]) };
        let mut tasks = TaskOutput::split(uninit, rows, m, 8);
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
