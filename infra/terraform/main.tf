# jaxchat on Cloud Run: service account, weights bucket, image repository and the service.
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

resource "google_artifact_registry_repository" "images" {
  repository_id = "jaxchat"
  location      = var.region
  format        = "DOCKER"
}

resource "google_cloud_run_v2_service" "jaxchat" {
  name     = var.service
  location = var.region

  template {
    service_account                  = google_service_account.jaxchat.email
    max_instance_request_concurrency = 64
    timeout                          = "3600s"
    scaling {
      min_instance_count = var.min_instances
      max_instance_count = var.max_instances
    }
    containers {
      image = var.image
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
  }
}

output "url" {
  value = google_cloud_run_v2_service.jaxchat.uri
}
