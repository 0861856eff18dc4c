# A team's database: `size` changes in place, a new `engine` replaces it.
terraform {
  required_providers {
    testcloud = { source = "infrakitchen.test/ik/testcloud", version = "~> 0.1" }
  }
}

variable "name" {
  type = string
}

variable "network_id" {
  type = string
}

variable "engine" {
  type    = string
  default = "postgres"
}

variable "size" {
  type    = number
  default = 10
}

resource "testcloud_database" "this" {
  name       = var.name
  network_id = var.network_id
  engine     = var.engine
  size       = var.size
}

output "endpoint" {
  value = testcloud_database.this.endpoint
}

output "password" {
  value     = testcloud_database.this.password
  sensitive = true
}
