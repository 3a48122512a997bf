//! Every integration test of `reprpo-train` in one test binary (one link instead of one per
//! file: the test build's size and time, see docs/ARCHITECTURE.md, "Tests"). Each module
//! is one test file; run one with `cargo test -p reprpo-train --test all <module>::`.

mod common;
mod config_messages;
mod config_paths;
mod device_step;
mod gradproj_step;
mod init_from;
mod jobs;
mod method_jobs;
mod method_step;
mod optim8bit;
mod quant_jobs;
mod ready_configs;
mod reference_model;
mod resume_integrity;
mod run_folders;
mod stops;
mod tensorboard;
mod train_reference;
mod trajectory;
