//! The Kubernetes client and the object storage client both build their TLS configuration in
//! one process (the agent has both). rustls refuses to pick a default crypto provider when
//! two are compiled in, so this catches a feature mix-up at build time of the clients rather
//! than in a cluster.

#[tokio::test]
async fn kube_and_storage_clients_build_with_tls() {
    let mut config = kube::Config::new("https://127.0.0.1:6443".parse().expect("uri"));
    config.accept_invalid_certs = false;
    kube::Client::try_from(config).expect("kube client with rustls");

    // As the agent does: storage (with its own runtime) on a blocking thread.
    tokio::task::spawn_blocking(storage_client)
        .await
        .expect("no panic");
}

fn storage_client() {
    let cfg = mapsnap::storage::StorageConfig {
        s3: vec![
            ("endpoint".into(), "https://127.0.0.1:9".into()),
            ("region".into(), "us-east-1".into()),
            ("access_key_id".into(), "k".into()),
            ("secret_access_key".into(), "s".into()),
        ],
        ..mapsnap::storage::StorageConfig::default()
    };
    let loc = mapsnap::storage::Location::parse("s3://bucket/key").expect("location");
    mapsnap::storage::Storage::open(loc, &cfg).expect("S3 client with rustls");
}
