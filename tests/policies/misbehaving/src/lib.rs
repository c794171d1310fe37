//! A policy that misbehaves in the way its cargo feature names; without a
//! feature it behaves (everything on the first node that holds it).

#[cfg(not(feature = "wrong-world"))]
mod policy {
    wit_bindgen::generate!({ world: "policy", path: "../../../wit" });

    use ringlet::scheduler::types::Stage;

    struct Misbehaving;

    impl Guest for Misbehaving {
        fn info() -> PolicyInfo {
            if cfg!(feature = "large") {
                // Not zeros, which would not be stored in the component.
                static BALLAST: [u8; 1 << 20] = [0x5a; 1 << 20];
                std::hint::black_box(&BALLAST);
            }
            PolicyInfo {
                name: "misbehaving".into(),
                version: "0.1.0".into(),
            }
        }

        fn place(cluster: Cluster, model: Model) -> Result<Plan, String> {
            let layers = model.layer_count;
            if cfg!(feature = "endless-loop") {
                let mut spins = 0u64;
                while std::hint::black_box(layers) > 0 {
                    spins = spins.wrapping_add(1);
                    std::hint::black_box(spins);
                }
            }
            if cfg!(feature = "memory-bomb") {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            if cfg!(feature = "panics") {
                panic!("this policy panics on purpose");
            }
            if cfg!(feature = "sleeps") {
                // The misbehaviour under test, not a wait: a guest blocked in
                // WASI's clock (no fuel burnt) must be stopped by the host's
                // 2 s wall-clock deadline.
                std::thread::sleep(std::time::Duration::from_secs(60));
            }
            let limit = if cfg!(feature = "fails-on-two-nodes") {
                2
            } else if cfg!(feature = "fails-on-three-nodes") {
                3
            } else {
                usize::MAX
            };
            if cluster.nodes.len() >= limit {
                panic!("this policy cannot place on {} nodes", cluster.nodes.len());
            }
            let node = cluster.nodes.first().map(|n| n.id).ok_or("no nodes")?;
            let stages = if cfg!(feature = "skips-layer") {
                vec![
                    Stage {
                        node,
                        start: 0,
                        end: 1,
                    },
                    Stage {
                        node,
                        start: 2,
                        end: layers,
                    },
                ]
            } else if cfg!(feature = "repeats-layer") {
                vec![
                    Stage {
                        node,
                        start: 0,
                        end: 2,
                    },
                    Stage {
                        node,
                        start: 1,
                        end: layers,
                    },
                ]
            } else {
                vec![Stage {
                    node,
                    start: 0,
                    end: layers,
                }]
            };
            Ok(Plan { stages })
        }

        fn schedule(queue: Vec<WaitingRequest>, _stages: Vec<StageLoad>) -> Vec<u64> {
            if cfg!(feature = "schedule-loops") {
                let mut spins = 0u64;
                while std::hint::black_box(queue.len()) < usize::MAX {
                    spins = spins.wrapping_add(1);
                    std::hint::black_box(spins);
                }
            }
            if cfg!(feature = "schedule-fails-on-long-queue") && queue.len() > 100 {
                panic!("this policy cannot schedule {} requests", queue.len());
            }
            queue.iter().map(|w| w.id).collect()
        }
    }

    export!(Misbehaving);
}

#[cfg(feature = "wrong-world")]
mod other {
    wit_bindgen::generate!({
        inline: "
            package test:other;
            world greeter {
                export greet: func(name: string) -> string;
            }
        ",
    });

    struct Greeter;

    impl Guest for Greeter {
        fn greet(name: String) -> String {
            format!("hello, {name}")
        }
    }

    export!(Greeter);
}
