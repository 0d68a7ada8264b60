//! Tenant isolation (issue 19): each test tries what a hostile project user (or a start config
//! naming a hostile image) would, and asserts it fails while the ordinary thing still works.
use crate::tb::{http, new_id, ok, sh, start, stop};

const DEST: &str = "com.cocalc.ProjectHost1";
const MANAGER: &str = "/com/cocalc/ProjectHost1";

/// The image names podman would import or pull from somewhere other than the host's store.
const HOSTILE_IMAGES: [&str; 8] = [
    "docker-archive:/var/tmp/iso-evil.tar",
    "docker-archive:/var/tmp/iso-evil.tar:localhost/cocalc-project:latest",
    "oci-archive:/var/tmp/iso-evil-oci.tar",
    "dir:/var/tmp/iso-evil-dir",
    "containers-storage:localhost/iso-evil:latest",
    "docker://localhost/iso-evil:latest",
    "oci:/var/tmp/iso-evil-oci:x",
    // plain, but not in the host's allowlist (the default: the default image only)
    "localhost/iso-evil:latest",
];

fn images_now() -> String {
    ok("podman images --format '{{.ID}} {{.Repository}}:{{.Tag}}' | sort")
}

#[test]
fn only_allowed_plain_images_run() {
    // archives that would replace the default image's tag if podman imported them
    ok(
        "podman save -q -o /var/tmp/iso-evil.tar localhost/cocalc-project:latest \
        && podman save -q --format oci-archive -o /var/tmp/iso-evil-oci.tar localhost/cocalc-project:latest \
        && rm -rf /var/tmp/iso-evil-dir && podman save -q --format docker-dir -o /var/tmp/iso-evil-dir localhost/cocalc-project:latest \
        && podman tag localhost/cocalc-project:latest localhost/iso-evil:latest",
    );
    let before = images_now();
    let id = new_id();
    for image in HOSTILE_IMAGES {
        let cfg = serde_json::json!({ "image": image }).to_string();
        let body = format!("{{\"config\":{cfg}}}");
        let (s, v) = http("POST", &format!("/projects/{id}/start"), Some(&body));
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("image_not_allowed")),
            "{image}: {v}"
        );
        // D-Bus and the CLI say the same
        let o = sh(&format!(
            "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager StartProject ss {id} '{cfg}'"
        ));
        assert_ne!(o.code, 0, "{image}: {o:?}");
        assert!(o.stderr.contains("image"), "{image}: {o:?}");
        let o = sh(&format!("cocalc-project-host start {id} --image '{image}'"));
        assert_eq!(o.code, 2, "{image}: {o:?}");
        assert!(o.stderr.contains("image"), "{image}: {o:?}");
    }
    let o = sh(&format!(
        "busctl call {DEST} {MANAGER} com.cocalc.ProjectHost1.Manager StartProject ss {id} \
         '{{\"image\":\"docker-archive:/var/tmp/iso-evil.tar\"}}'"
    ));
    assert!(
        o.stderr.contains("not a plain image reference"),
        "D-Bus error: {o:?}"
    );
    // nothing was imported, nothing started, nothing recorded
    assert_eq!(images_now(), before);
    assert_eq!(
        ok(&format!(
            "systemctl list-units --all --no-legend 'cocalc-project-{id}.service' | wc -l"
        )),
        "0"
    );
    let (s, v) = http("GET", &format!("/projects/{id}/status"), None);
    assert_eq!((s, v["state"].as_str()), (200, Some("opened")), "{v}");
    // the default image, named or not, still runs
    start(&id, Some(r#"{"image":"localhost/cocalc-project:latest"}"#));
    stop(&id, true);
    ok("podman rmi -f localhost/iso-evil:latest >/dev/null; \
        rm -rf /var/tmp/iso-evil.tar /var/tmp/iso-evil-oci.tar /var/tmp/iso-evil-dir");
}
