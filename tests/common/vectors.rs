//! DESIGN.md §3 test vectors V1-V4, as one table every store must reproduce exactly.

use std::time::Duration;

use tollgate::{Decision, Key, Outcome, Policy, Quota};

/// One request of a vector and what the store must answer.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Milliseconds since the vector's start.
    pub t_ms: u64,
    pub cost: u32,
    pub outcome: Outcome,
    pub remaining: u32,
    /// `None`: not checked by this row.
    pub reset_ms: Option<u64>,
    /// For denials: the retry_after in ms. `None` for allowed and impossible requests.
    pub retry_ms: Option<u64>,
    /// Time until one more unit is available (the `t` of the RateLimit field), when given.
    pub next_ms: Option<u64>,
}

pub struct Vector {
    pub name: &'static str,
    pub quota: &'static str,
    pub rows: Vec<Row>,
}

const A: Outcome = Outcome::Allowed;
const D: Outcome = Outcome::Denied;
const I: Outcome = Outcome::Impossible;

fn row(t_ms: u64, cost: u32, outcome: Outcome, remaining: u32) -> Row {
    Row {
        t_ms,
        cost,
        outcome,
        remaining,
        reset_ms: None,
        retry_ms: None,
        next_ms: None,
    }
}

impl Row {
    fn reset(mut self, ms: u64) -> Self {
        self.reset_ms = Some(ms);
        self
    }
    fn retry(mut self, ms: u64) -> Self {
        self.retry_ms = Some(ms);
        self
    }
    fn next(mut self, ms: u64) -> Self {
        self.next_ms = Some(ms);
        self
    }
}

pub fn vectors() -> Vec<Vector> {
    vec![
        Vector {
            name: "V1",
            quota: "5/5s",
            rows: vec![
                row(0, 6, I, 5).reset(0).next(0),
                row(0, 1, A, 4).reset(1000).next(1000),
                row(0, 1, A, 3).reset(2000).next(1000),
                row(0, 1, A, 2).reset(3000).next(1000),
                row(0, 1, A, 1).reset(4000).next(1000),
                row(0, 1, A, 0).reset(5000).next(1000),
                row(0, 1, D, 0).reset(5000).retry(1000).next(1000),
                row(3000, 1, A, 2).reset(3000).next(1000),
                row(3100, 1, A, 1).reset(3900).next(900),
                row(4000, 1, A, 1).reset(4000).next(1000),
                row(8000, 1, A, 4).reset(1000).next(1000),
                row(9500, 1, A, 4).reset(1000).next(1000),
                row(9500, 0, A, 4).reset(1000).next(1000),
                row(9500, 2, A, 2).reset(3000).next(1000),
                row(9500, 5, D, 2).reset(3000).retry(3000).next(1000),
                row(20000, 1, A, 4).reset(1000),
            ],
        },
        Vector {
            name: "V2",
            quota: "5/s",
            rows: vec![
                row(0, 1, A, 4),
                row(0, 1, A, 3),
                row(0, 1, A, 2),
                row(0, 1, A, 1),
                row(0, 1, A, 0),
                row(0, 1, D, 0).retry(200),
                row(150, 1, D, 0).retry(50),
                row(200, 1, A, 0),
                row(201, 1, D, 0).retry(199),
                row(1000, 1, A, 3),
                row(2000, 1, A, 4),
            ],
        },
        Vector {
            name: "V3",
            quota: "1/s",
            rows: vec![
                row(0, 1, A, 0),
                row(0, 1, D, 0).retry(1000),
                row(500, 1, D, 0).retry(500),
                row(999, 1, D, 0).retry(1),
                row(1000, 1, A, 0),
                row(1500, 1, D, 0).retry(500),
                row(2500, 1, A, 0),
            ],
        },
        Vector {
            name: "V4",
            quota: "10/s",
            rows: vec![
                row(0, 3, A, 7).reset(300),
                row(0, 7, A, 0).reset(1000),
                row(0, 1, D, 0).retry(100),
                row(50, 1, D, 0).retry(50),
                row(100, 1, A, 0),
                row(100, 2, D, 0).retry(200),
                row(100, 11, I, 0),
                row(5000, 11, I, 10),
            ],
        },
    ]
}

/// A store under test, driven at chosen instants.
pub trait Target {
    /// Checks `cost` for `key` at `t_ms` after the vector's start.
    async fn check(&mut self, policy: &Policy, key: &Key, t_ms: u64, cost: u32) -> Decision;
}

/// Runs every vector against `target`, each on its own key (prefixed with `run`), and panics
/// with the vector, row and both decisions on the first difference.
pub async fn run_all(target: &mut impl Target, run: &str) {
    for vector in vectors() {
        let quota: Quota = vector.quota.parse().unwrap();
        let policy = Policy::new("default", quota).unwrap();
        let key = Key::from(format!("{run}-{}", vector.name));
        for (i, row) in vector.rows.iter().enumerate() {
            let d = target.check(&policy, &key, row.t_ms, row.cost).await;
            let at = format!("{} row {i} {row:?}: got {d:?}", vector.name);
            assert_eq!(d.outcome(), row.outcome, "outcome, {at}");
            assert_eq!(d.remaining(), row.remaining, "remaining, {at}");
            assert_eq!(d.capacity(), quota.capacity(), "capacity, {at}");
            if let Some(ms) = row.reset_ms {
                assert_eq!(
                    d.reset_after(),
                    Duration::from_millis(ms),
                    "reset_after, {at}"
                );
            }
            assert_eq!(
                d.retry_after(),
                row.retry_ms.map(Duration::from_millis),
                "retry_after, {at}"
            );
            if let Some(ms) = row.next_ms {
                assert_eq!(
                    d.next_available(),
                    Duration::from_millis(ms),
                    "next_available, {at}"
                );
            }
        }
    }
}

/// One request of the multi-quota vector M1 and what the store must answer.
#[derive(Debug, Clone, Copy)]
pub struct MultiRow {
    pub t_ms: u64,
    pub cost: u32,
    pub outcome: Outcome,
    /// Each quota's remaining, in the policy's order.
    pub remaining: [u32; 2],
    pub retry_ms: Option<u64>,
}

/// M1: policy "multi" = 2/s (T = 500 ms, B = 2) AND 5/h (T = 720 s, B = 5). A request passes
/// only if both admit it; a denial charges neither (the admitting quota reports its state
/// unchanged); Retry-After is the binding quota's wait.
pub fn multi_vector() -> (&'static [&'static str], Vec<MultiRow>) {
    let r = |t_ms, cost, outcome, remaining, retry_ms| MultiRow {
        t_ms,
        cost,
        outcome,
        remaining,
        retry_ms,
    };
    (
        &["2/s", "5/h"],
        vec![
            r(0, 1, A, [1, 4], None),
            r(0, 1, A, [0, 3], None),
            r(0, 1, D, [0, 3], Some(500)),
            r(500, 1, A, [0, 2], None),
            r(1000, 1, A, [0, 1], None),
            r(2000, 1, A, [1, 0], None),
            r(3000, 1, D, [2, 0], Some(717_000)),
            r(3000, 3, I, [2, 0], None),
            r(3000, 0, A, [2, 0], None),
        ],
    )
}

/// Runs M1 against `target` on its own key, panicking on the first difference.
pub async fn run_multi(target: &mut impl Target, run: &str) {
    let (quotas, rows) = multi_vector();
    let quotas: Vec<Quota> = quotas.iter().map(|q| q.parse().unwrap()).collect();
    let policy = Policy::multi("multi", quotas).unwrap();
    let key = Key::from(format!("{run}-M1"));
    for (i, row) in rows.iter().enumerate() {
        let d = target.check(&policy, &key, row.t_ms, row.cost).await;
        let at = format!("M1 row {i} {row:?}: got {d:?}");
        assert_eq!(d.outcome(), row.outcome, "outcome, {at}");
        let remaining: Vec<u32> = d.per_quota().iter().map(|q| q.remaining()).collect();
        assert_eq!(
            remaining,
            row.remaining.to_vec(),
            "remaining per quota, {at}"
        );
        if row.outcome != Outcome::Impossible {
            // The binding quota speaks for the policy: the fewest remaining.
            assert_eq!(
                d.remaining(),
                *row.remaining.iter().min().unwrap(),
                "remaining, {at}"
            );
        }
        assert_eq!(
            d.retry_after(),
            row.retry_ms.map(Duration::from_millis),
            "retry_after, {at}"
        );
    }
}
