-- One database per service (no service reads another's database).
CREATE DATABASE ik_blueprint;
CREATE DATABASE ik_workflow;
CREATE DATABASE ik_resource;
CREATE DATABASE ik_executor;
CREATE DATABASE ik_approval;
