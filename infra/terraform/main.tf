# jaxchat on Cloud Run: service account, weights bucket, image repository and the service,
# and optionally (var.memorystore) a Redis for limits, budgets and the response cache.
#   terraform init && terraform apply -var project=MY_PROJECT -var image=REGION-docker.pkg.dev/...
terraform {
  required_providers {
    google = { source = "hashicorp/google", version = ">= 5.0" }
  }
}

provider "google" {
  project = var.project
  region  = var.region
}

resource "google_service_account" "jaxchat" {
  account_id   = "jaxchat"
  display_name = "jaxchat inference service"
}

resource "google_storage_bucket" "weights" {
  name                        = "${var.project}-jaxchat-weights"
  location                    = var.region
  uniform_bucket_level_access = true
}

resource "google_storage_bucket_iam_member" "weights_reader" {
  bucket = google_storage_bucket.weights.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.jaxchat.email}"
}

# The shared compilation cache (JAXCHAT_COMPILE_CACHE) lives in the same bucket: instances
# list and read it, and upload the executables they compiled (never overwriting one).
resource "google_storage_bucket_iam_member" "compile_cache_writer" {
  bucket = google_storage_bucket.weights.name
  role   = "roles/storage.objectCreator"
  member = "serviceAccount:${google_service_account.jaxchat.email}"
}

resource "google_project_iam_member" "metric_writer" {
  count   = var.managed_prometheus ? 1 : 0
  project = var.project
  role    = "roles/monitoring.metricWriter"
  member  = "serviceAccount:${google_service_account.jaxchat.email}"
}

resource "google_artifact_registry_repository" "images" {
  repository_id = "jaxchat"
  location      = var.region
  format        = "DOCKER"
}

# Optional shared state (var.memorystore): limits, budgets and the response cache in one
# Redis that every instance reaches over the VPC. STANDARD_HA keeps a replica, and RDB
# snapshots keep usage across a full restart (up to the last snapshot).
resource "google_redis_instance" "state" {
  count              = var.memorystore ? 1 : 0
  name               = "${var.service}-state"
  tier               = "STANDARD_HA"
  memory_size_gb     = var.memorystore_size_gb
  region             = var.region
  authorized_network = "projects/${var.project}/global/networks/${var.network}"
  auth_enabled       = true
  redis_version      = "REDIS_7_2"
  persistence_config {
    persistence_mode    = "RDB"
    rdb_snapshot_period = "ONE_HOUR"
  }
}

# JAXCHAT_STATE_URL holds the instance's AUTH string: a secret, not a plain variable.
resource "google_secret_manager_secret" "state_url" {
  count     = var.memorystore ? 1 : 0
  secret_id = "${var.service}-state-url"
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "state_url" {
  count  = var.memorystore ? 1 : 0
  secret = google_secret_manager_secret.state_url[0].id
  secret_data = format(
    "redis://:%s@%s:%d/0",
    google_redis_instance.state[0].auth_string,
    google_redis_instance.state[0].host,
    google_redis_instance.state[0].port,
  )
}

resource "google_secret_manager_secret_iam_member" "state_url_reader" {
  count     = var.memorystore ? 1 : 0
  secret_id = google_secret_manager_secret.state_url[0].id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.jaxchat.email}"
}

resource "google_cloud_run_v2_service" "jaxchat" {
  name     = var.service
  location = var.region
  # The instances read JAXCHAT_STATE_URL's secret as they start.
  depends_on = [
    google_secret_manager_secret_version.state_url,
    google_secret_manager_secret_iam_member.state_url_reader,
  ]

  template {
    service_account                  = google_service_account.jaxchat.email
    max_instance_request_concurrency = 64
    timeout                          = "3600s"
    scaling {
      min_instance_count = var.min_instances
      max_instance_count = var.max_instances
    }
    # Direct VPC egress to Memorystore's private address.
    dynamic "vpc_access" {
      for_each = var.memorystore ? [1] : []
      content {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = var.network
          subnetwork = var.network
        }
      }
    }
    containers {
      name  = "jaxchat"
      image = var.image
      ports {
        container_port = 8080
      }
      resources {
        limits            = { cpu = "4", memory = "8Gi" }
        cpu_idle          = false # the scheduler thread decodes between requests' chunks
        startup_cpu_boost = true
      }
      env {
        name  = "JAXCHAT_MODEL_NAME"
        value = var.model_name
      }
      env {
        name  = "JAXCHAT_MODEL_ALIASES"
        value = join(",", var.model_aliases)
      }
      env {
        name  = "JAXCHAT_COMPILE_CACHE"
        value = "gs://${google_storage_bucket.weights.name}/compile-cache"
      }
      dynamic "env" {
        for_each = var.keys_file == "" ? [] : [var.keys_file]
        content {
          name  = "JAXCHAT_KEYS_FILE"
          value = env.value
        }
      }
      dynamic "env" {
        for_each = var.response_cache_ttl == 0 ? [] : [var.response_cache_ttl]
        content {
          name  = "JAXCHAT_RESPONSE_CACHE_TTL"
          value = tostring(env.value)
        }
      }
      dynamic "env" {
        for_each = var.memorystore ? [1] : []
        content {
          name = "JAXCHAT_STATE_URL"
          value_source {
            secret_key_ref {
              secret  = google_secret_manager_secret.state_url[0].secret_id
              version = "latest"
            }
          }
        }
      }
      dynamic "env" {
        for_each = var.model_uri == "" ? [] : [var.model_uri]
        content {
          name  = "JAXCHAT_MODEL"
          value = env.value
        }
      }
      # /health answers 503 until the model is loaded and compiled.
      startup_probe {
        http_get { path = "/health" }
        period_seconds    = 5
        failure_threshold = 120
      }
      # /health turns 503 for good if the engine fails (a device fault): replace the instance.
      liveness_probe {
        http_get { path = "/health" }
        period_seconds = 30
      }
    }
    # Google Cloud Managed Service for Prometheus: the collector sidecar scrapes
    # localhost:8080/metrics every minute (its default) and writes to Cloud Monitoring.
    dynamic "containers" {
      for_each = var.managed_prometheus ? [1] : []
      content {
        name       = "collector"
        image      = "us-docker.pkg.dev/cloud-ops-agents-artifacts/cloud-run-gmp-sidecar/cloud-run-gmp-sidecar:1.1.1"
        depends_on = ["jaxchat"]
        resources {
          limits = { cpu = "1", memory = "512Mi" }
        }
      }
    }
  }
}

output "url" {
  value = google_cloud_run_v2_service.jaxchat.uri
}
