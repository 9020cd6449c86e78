use super::volume::VolumeCmd;
use super::*;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use common::throttle::{QosConfig, QosError};

#[derive(Debug, Parser)]
#[command(name = "stockade")]
struct TestCli {
    #[command(flatten)]
    opts: AdminOpts,
    #[command(subcommand)]
    cmd: AdminCommand,
}

fn parse_all(args: &[&str]) -> Result<(AdminOpts, AdminCommand), clap::Error> {
    TestCli::try_parse_from(std::iter::once("stockade").chain(args.iter().copied()))
        .map(|c| (c.opts, c.cmd))
}

fn parse(args: &[&str]) -> Result<AdminCommand, clap::Error> {
    parse_all(args).map(|(_, c)| c)
}

fn volume(args: &[&str]) -> (AdminOpts, VolumeCmd) {
    let mut all = vec!["volume"];
    all.extend_from_slice(args);
    match parse_all(&all) {
        Ok((opts, AdminCommand::Volume(v))) => (opts, v.cmd),
        other => panic!("{args:?}: {other:?}"),
    }
}

fn kind(args: &[&str]) -> ErrorKind {
    parse(args).expect_err("must not parse").kind()
}

#[test]
fn the_command_definition_is_consistent() {
    TestCli::command().debug_assert();
}

/// The request `stockade volume create db ARGS…` sends (or the CLI's own refusal).
fn create_request(args: &[&str]) -> Result<common::admin::CreateVolume, CliError> {
    let mut all = vec!["create", "db"];
    all.extend_from_slice(args);
    let (_, cmd) = volume(&all);
    let VolumeCmd::Create(a) = cmd else {
        panic!("{cmd:?}")
    };
    a.request()
}

#[test]
fn create_reads_sizes_and_qos() {
    let req = create_request(&["--size", "10G"]).unwrap();
    assert_eq!(
        (req.name.as_str(), req.size, req.qos, req.qos_changes),
        ("db", 10 << 30, None, None)
    );

    let req = create_request(&[
        "--size",
        "512MiB",
        "--iops",
        "3000",
        "--burst-iops",
        "6000",
        "--burst-credits",
        "5400000",
        "--bandwidth",
        "100MiB",
    ])
    .unwrap();
    assert_eq!(req.size, 512 << 20);
    assert_eq!(req.qos, None);
    let changes = req.qos_changes.expect("QoS options given");
    assert_eq!(
        changes.apply(QosConfig::UNLIMITED),
        QosConfig {
            iops: Some(3000),
            burst_iops: Some(6000),
            burst_credits: 5_400_000,
            bandwidth: Some(100 << 20),
        }
    );

    // One option changes one field of the cluster's default: the others stay the default's.
    let default = QosConfig {
        iops: Some(300),
        burst_iops: Some(3000),
        burst_credits: 5_400_000,
        bandwidth: Some(128 << 20),
    };
    let req = create_request(&["--size", "1G", "--iops", "1000"]).unwrap();
    assert_eq!(
        req.qos(default),
        Ok(QosConfig {
            iops: Some(1000),
            ..default
        })
    );
    // A burst without a baseline is refused by the cluster when its default has none.
    let req = create_request(&["--size", "1G", "--burst-iops", "10"]).unwrap();
    assert!(req.qos(QosConfig::UNLIMITED).is_err());
    // A burst ceiling without credits could never be used: refused too.
    let req = create_request(&["--size", "1G", "--iops", "300", "--burst-iops", "3000"]).unwrap();
    let e = req.qos(QosConfig::UNLIMITED).unwrap_err();
    assert!(e.contains("burst credits"), "{e}");
    // A ceiling below the baseline, both given here, is refused before sending anything.
    assert!(matches!(
        create_request(&["--size", "1G", "--iops", "300", "--burst-iops", "10"]),
        Err(CliError::Qos(QosError::BurstBelowBaseline { .. }))
    ));
}

#[test]
fn bad_or_missing_arguments_are_usage_errors() {
    assert_eq!(
        kind(&["volume", "create", "db"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        kind(&["volume", "create", "db", "--size", "1000"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        kind(&["volume", "create", "db", "--size", "ten"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        kind(&["volume", "create", "a/b", "--size", "1G"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        kind(&["volume", "create", "db", "--size", "1G", "--iops", "0"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        kind(&["volume", "resize", "db"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        kind(&["volume", "show"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        kind(&["volume", "qos", "db", "--iops", "0"]),
        ErrorKind::ValueValidation
    );
    assert_eq!(
        kind(&["volume", "qos", "db", "--burst-credits", "none"]),
        ErrorKind::ValueValidation
    );
    // --listen and the other endpoint options only with --local.
    assert_eq!(
        kind(&["volume", "attach", "db", "--listen", "127.0.0.1:1"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        kind(&["volume", "attach", "db", "--local", "--listen", "nowhere"]),
        ErrorKind::ValueValidation
    );
    let (_, cmd) = volume(&["attach", "db", "--local", "--listen", "127.0.0.1:10900"]);
    let VolumeCmd::Attach(a) = cmd else {
        panic!("{cmd:?}")
    };
    assert!(a.local.local && a.local.listen.port() == 10900);
    assert_eq!(
        kind(&["volume", "import", "db"]),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(
        kind(&["volume", "export", "db", "out.img", "--overwrite"]),
        ErrorKind::UnknownArgument
    );
    assert_eq!(
        kind(&["volume", "frobnicate"]),
        ErrorKind::InvalidSubcommand
    );

    // The message says what is wrong.
    let e = parse(&["volume", "create", "db", "--size", "1000"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a multiple of 4096"), "{e}");
}

#[test]
fn qos_needs_an_option_and_sends_only_those_given() {
    let e = parse(&["volume", "qos", "db"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    let text = e.to_string();
    assert!(
        text.contains("--iops") && text.contains("--bandwidth"),
        "{text}"
    );

    let (_, cmd) = volume(&["qos", "db", "--iops", "none", "--bandwidth", "1G"]);
    let VolumeCmd::Qos(a) = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(
        serde_json::to_string(&a.request()).unwrap(),
        r#"{"iops":null,"bandwidth":1073741824}"#
    );
    let (_, cmd) = volume(&["qos", "db", "--burst-iops", "900", "--burst-credits", "0"]);
    let VolumeCmd::Qos(a) = cmd else {
        panic!("{cmd:?}")
    };
    assert_eq!(
        serde_json::to_string(&a.request()).unwrap(),
        r#"{"burst_iops":900,"burst_credits":0}"#
    );
}

#[test]
fn global_options_go_before_or_after_the_subcommand() {
    let (o, cmd) = volume(&[
        "list",
        "--json",
        "--endpoint",
        "http://a:1,http://b:2",
        "--token-file",
        "/t",
        "--data-dir",
        "/d",
    ]);
    assert!(matches!(cmd, VolumeCmd::List));
    assert!(o.json);
    assert_eq!(o.endpoints, ["http://a:1", "http://b:2"]);
    assert_eq!(o.token_file, Some(PathBuf::from("/t")));
    assert_eq!(o.data_dir, PathBuf::from("/d"));

    let (o, _) = volume(&["--json", "show", "db"]);
    assert!(o.json);
    // Without the flags: the environment's values, else the defaults.
    let from_env: Vec<String> = std::env::var("STOCKADE_ENDPOINT")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    assert_eq!(o.endpoints, from_env);
    let data_dir = std::env::var_os("STOCKADE_DATA_DIR")
        .map_or_else(|| PathBuf::from("./stockade-data"), PathBuf::from);
    assert_eq!(o.data_dir, data_dir);

    for args in [
        &["sled", "list", "--json"][..],
        &["node", "list"],
        &["cluster", "status", "--endpoint", "127.0.0.1:9180"],
    ] {
        parse(args).unwrap();
    }
}

#[test]
fn attach_and_detach_requests() {
    let (_, cmd) = volume(&["attach", "db", "--shared", "--client", "host-a"]);
    let VolumeCmd::Attach(a) = cmd else {
        panic!("{cmd:?}")
    };
    let r = a.request();
    assert!(r.shared);
    assert_eq!(r.client.as_deref(), Some("host-a"));
    let (_, cmd) = volume(&["detach", "db", "--attachment", "3"]);
    assert!(matches!(cmd, VolumeCmd::Detach(d) if d.attachment == Some(3)));
    let (_, cmd) = volume(&["delete", "db", "--force"]);
    assert!(matches!(cmd, VolumeCmd::Delete(d) if d.force && d.name == "db"));
}

fn refused() -> AdminError {
    AdminError::Unreachable {
        endpoints: vec!["http://127.0.0.1:9180".to_string()],
        source: HttpError::Connect {
            addr: "127.0.0.1:9180".to_string(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        },
    }
}

fn api(status: u16, code: &str, message: &str) -> AdminError {
    AdminError::Api {
        status,
        code: code.to_string(),
        message: message.to_string(),
    }
}

#[test]
fn errors_say_what_to_do() {
    let unauthorized = AdminError::Unauthorized {
        url: "http://h:1".to_string(),
    };
    assert_eq!(
        describe(&unauthorized, None),
        "the admin API refused the token (HTTP 401): pass --token-file or set STOCKADE_TOKEN_FILE to the cluster's admin.token"
    );
    let with_note = describe(
        &unauthorized,
        Some("no token was sent: /d/admin.token does not exist"),
    );
    assert!(
        with_note.ends_with("(no token was sent: /d/admin.token does not exist)"),
        "{with_note}"
    );

    for status in [400, 404, 409, 507] {
        assert_eq!(
            describe(&api(status, "x", "volume \"a\" exists"), None),
            "volume \"a\" exists"
        );
    }
    let e = describe(&api(503, "no_leader", "no metadata leader"), None);
    assert!(e.starts_with("no metadata leader"), "{e}");
    assert!(e.contains("election") && e.contains("retry"), "{e}");
    // Other 503s name their own cause: no election hint.
    let e = describe(&api(503, "unavailable", "volume group has no leader"), None);
    assert_eq!(e, "volume group has no leader (HTTP 503)");
    let e = describe(&api(504, "outcome_unknown", "answer lost"), None);
    assert_eq!(e, "answer lost (HTTP 504)");
    let e = describe(&api(500, "internal", "disk on fire"), None);
    assert!(e.contains("disk on fire") && e.contains("500"), "{e}");

    let e = describe(&refused(), None);
    assert!(
        e.starts_with("cannot reach the admin API at http://127.0.0.1:9180: "),
        "{e}"
    );
    assert!(
        e.ends_with("; is the cluster running (`stockade up`)?"),
        "{e}"
    );
    assert!(!e.contains("connecting to"), "the cause once: {e}");

    let decode = serde_json::from_str::<u8>("x").unwrap_err();
    let e = describe(
        &AdminError::Decode {
            url: "http://h:1".to_string(),
            status: 200,
            source: decode,
        },
        None,
    );
    assert!(
        e.contains("unexpected answer from the admin API at http://h:1 (HTTP 200)"),
        "{e}"
    );

    // Through CliError: the note travels with the error, and the exit code is 1.
    let e = CliError::Admin {
        source: unauthorized,
        token_note: Some("n".to_string()),
    };
    assert!(e.to_string().ends_with("(n)"));
    assert_eq!(e.exit_code(), 1);
    assert_eq!(CliError::from(refused()).exit_code(), 1);
}

struct Failing(std::io::ErrorKind);

impl Write for Failing {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(self.0.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn output_is_written_once_with_a_newline() {
    let mut v = Vec::new();
    Output::Text("a".to_string()).write(&mut v).unwrap();
    Output::Text("b\n".to_string()).write(&mut v).unwrap();
    Output::Nothing.write(&mut v).unwrap();
    Output::Json(serde_json::json!({"k": [1]}))
        .write(&mut v)
        .unwrap();
    assert_eq!(
        String::from_utf8(v).unwrap(),
        "a\nb\n{\n  \"k\": [\n    1\n  ]\n}\n"
    );

    let doc = vec![1u8, 2];
    assert_eq!(
        Output::of(true, &doc, |_| unreachable!()).unwrap(),
        Output::Json(serde_json::json!([1, 2]))
    );
    assert_eq!(
        Output::of(false, &doc, |d| format!("{}", d.len())).unwrap(),
        Output::Text("2".to_string())
    );

    // A closed pipe is fine, other failures are errors.
    let t = Output::Text("x".to_string());
    t.write(&mut Failing(std::io::ErrorKind::BrokenPipe))
        .unwrap();
    assert!(matches!(
        t.write(&mut Failing(std::io::ErrorKind::PermissionDenied)),
        Err(CliError::Output(_))
    ));
}

#[test]
fn completions_cover_the_admin_commands() {
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let Output::Text(script) = completions(shell, &mut TestCli::command()) else {
            panic!("text")
        };
        assert!(script.contains("stockade"), "{shell}");
        assert!(script.contains("burst-iops"), "{shell}");
        assert!(script.contains("token-file"), "{shell}");
    }
}
